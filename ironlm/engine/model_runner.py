"""Runs one scheduled step: builds the flat token batch and its attention metadata, runs the model, samples."""
import torch

from ironlm import kernels
from ironlm.engine.sequence import Sequence
from ironlm.layers.attention import AttentionMetadata
from ironlm.layers.module import bind_submodules
from ironlm.models.llama import LlamaForCausalLM
from ironlm.sampling import Sampler, SampleResult, SampleState


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, kv_pool: torch.Tensor, kv_scales: torch.Tensor | None,
                 block_size: int):
        self.model = model
        bind_submodules(model)  # the model is whole now: its children resolve as plain attributes from here on
        self.block_size = block_size
        self.kv_pool = kv_pool
        for index, attn in enumerate(model.attention_layers()):
            scales = (None, None) if kv_scales is None else (kv_scales[index, 0], kv_scales[index, 1])  # int8 pools
            attn.cache = kernels.PagedCache(kv_pool[index, 0], kv_pool[index, 1], *scales)
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}  # seeded requests only

    @torch.inference_mode()
    def execute(self, scheduled: list[tuple[Sequence, int]]) -> dict[str, SampleResult]:
        """Computes the scheduled tokens; returns a sampled token for each sequence whose last token was computed."""
        hidden, sampling_rows, sampling_seqs = self._forward(scheduled)
        if not sampling_seqs:
            return {}
        logits = self.model.compute_logits(hidden[sampling_rows])  # (S, V)
        states = [SampleState(seq.params, seq.prompt_token_ids, seq.output_token_ids, self._generator(seq))
                  for seq in sampling_seqs]
        results = self.sampler(logits, states)
        return {seq.request_id: result for seq, result in zip(sampling_seqs, results)}

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

    def _forward(self, scheduled: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[int], list[Sequence]]:
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

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        if seq.request_id not in self.generators:
            self.generators[seq.request_id] = torch.Generator().manual_seed(seq.params.seed)
        return self.generators[seq.request_id]

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
