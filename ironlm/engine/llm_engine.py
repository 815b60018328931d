"""The engine step loop shared by LLM.generate, the server and batch jobs."""
import ctypes
import dataclasses
import time

import torch

from ironlm import kernels
from ironlm.config import EngineConfig, kv_cache_dtype_for
from ironlm.engine.block_manager import BlockManager
from ironlm.engine.kv_cache import allocate_kv_pool, allocate_kv_scales, kv_bytes_per_block
from ironlm.engine.lookup import LookupIndex
from ironlm.engine.model_runner import ModelRunner
from ironlm.engine.output import OutputState, RequestOutput
from ironlm.engine.scheduler import Scheduler
from ironlm.engine.sequence import Sequence
from ironlm.errors import RequestError
from ironlm.formats import default_model_path, load_checkpoint
from ironlm.grammar import GrammarCompiler
from ironlm.hardware import default_dtype, default_kv_cache_bytes, default_threads
from ironlm.models import get_model_class
from ironlm.models.llama import ModelArgs
from ironlm.models.loader import load_model
from ironlm.sampling import SampleResult, SamplingParams

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Rows a step may hold once prompt-lookup drafts are added: on this project's 2-core Zen 4, drafts gained in steps
# of up to 12 rows, broke even at 20 and lost from 24 (135M; benchmarks/prompt_lookup.py --batches), and a 1.7B
# step of 5 rows costs 1.7-1.9x one of 1 row in its int formats (--step-costs), so a few drafts per sequence is
# where they pay.
DRAFT_ROWS = 12


class LLMEngine:
    def __init__(self, config: EngineConfig):
        config.validate()
        self.config = config
        self.checkpoint = load_checkpoint(config.model if config.model is not None else default_model_path())
        self.tokenizer = self.checkpoint.tokenizer
        if config.chat_template is not None:
            self.tokenizer = self.tokenizer.with_chat_template(config.chat_template, "--chat-template")
        self.model_name = self.checkpoint.name
        self.dtype_name = config.dtype or default_dtype()
        self.dtype = TORCH_DTYPES[self.dtype_name]
        self.kv_dtype_name = kv_cache_dtype_for(config.kv_cache_dtype, config.dtype)
        self.kv_dtype = {**TORCH_DTYPES, "int8": torch.int8}[self.kv_dtype_name]
        self.threads = config.threads or default_threads()
        torch.set_num_threads(self.threads)
        kernels.set_num_threads(self.threads)  # our pool and torch's both sized to the physical cores

        get_model_class(self.checkpoint.config)  # an unsupported family fails before anything else is read
        args = ModelArgs.from_hf(self.checkpoint.config)
        self.args = args
        block_size = config.block_size
        model_len = config.max_model_len or args.max_position_embeddings
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        else:
            wanted = config.max_num_seqs * -(-model_len // block_size)
            per_block = kv_bytes_per_block(args, block_size, self.kv_dtype)
            budget = config.kv_cache_bytes
            if budget is None:
                # A context length that was asked for is held whole where the memory allows, even past the
                # default share: a resumed job asks for its first run's, which its prompts were cut to.
                one_context = -(-model_len // block_size) * per_block if config.max_model_len else 0
                budget = default_kv_cache_bytes(sum(t.nbytes for t in self.checkpoint.tensors.values()),
                                                at_least=one_context)
            affordable = budget // per_block
            num_blocks = max(1, min(wanted, affordable))
        # One sequence must always fit on its own, or it could never finish.
        self.max_model_len = min(model_len, num_blocks * block_size)
        self.kv_bounds_context = self.max_model_len < model_len
        self.model = load_model(self.checkpoint, self.dtype, self.max_model_len, config.quant)
        _tune_heap()
        self.kv_pool = allocate_kv_pool(args, num_blocks, block_size, self.kv_dtype)
        self.kv_scales = allocate_kv_scales(args, num_blocks, block_size) if self.kv_dtype is torch.int8 else None
        self.block_manager = BlockManager(num_blocks, block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.kv_pool, self.kv_scales, block_size, self.max_model_len,
                                  config.enforce_eager)
        self.sequences: dict[str, Sequence] = {}
        self.lookups: dict[str, LookupIndex] = {}  # per request, with prompt lookup
        self.num_steps = 0
        self.num_draft_tokens = 0       # prompt lookup's drafts computed, and of those, kept
        self.num_kept_draft_tokens = 0
        self.grammar = GrammarCompiler(self.tokenizer, self.tokenizer.vocab_size)  # built at the first json_schema

    # --- requests -------------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.sequences:
            raise RequestError(f"request id {request_id!r} is already in use", param="request_id")
        params.validate(self.args.vocab_size)
        if not prompt_token_ids:
            raise RequestError("the prompt is empty; give at least one token", param="prompt")
        for token_id in prompt_token_ids:
            if not isinstance(token_id, int) or not 0 <= token_id < self.args.vocab_size:
                raise RequestError(
                    f"prompt token id {token_id!r} is outside the vocabulary (0..{self.args.vocab_size - 1})",
                    param="prompt",
                )
        if len(prompt_token_ids) >= self.max_model_len:
            holder, remedy = "this model's context holds", ""
            if self.kv_bounds_context:
                holder, remedy = "the KV cache's memory holds", " or give the KV cache more memory (--kv-cache-memory)"
            raise RequestError(
                f"the prompt has {len(prompt_token_ids)} tokens but {holder} {self.max_model_len} (prompt plus at least "
                f"one new token); shorten the prompt{remedy}",
                param="messages", code="context_length_exceeded",
            )
        if params.json_schema is not None:  # each sequence gets its own grammar state
            processor, = self.grammar.compile(params.json_schema, 1)
            params = dataclasses.replace(params, json_schema=None, logits_processor=processor)
        seq = Sequence(request_id, prompt_token_ids, params)
        seq.output_state = OutputState(self.tokenizer, seq)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq, "abort")
            self.runner.release(request_id)
            self.lookups.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # --- the step -------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        drafts = self._draft(out) if self.config.prompt_lookup else {}
        sampled = self.runner.execute(out.scheduled, drafts)
        for index, (seq, num_new) in enumerate(out.scheduled):
            if seq.request_id in drafts:  # the KV of the drafts the model disagreed with is to be written over
                num_drafts, num_kept = drafts[seq.request_id], len(sampled[seq.request_id]) - 1
                out.scheduled[index] = (seq, num_new - num_drafts + num_kept)
                self.num_draft_tokens += num_drafts
                self.num_kept_draft_tokens += num_kept
        self.scheduler.after_step(out)
        self.num_steps += 1
        now = time.monotonic()
        outputs = []
        for seq, _ in out.scheduled:
            if seq.request_id in drafts:  # the drafts kept come back as sampled tokens
                del seq.token_ids[seq.num_tokens - drafts[seq.request_id]:]
            sampled_results = sampled.get(seq.request_id)
            if sampled_results is None:
                continue  # a prompt chunk that did not reach the end yet
            prompt_logprobs = None
            if seq.first_token_time is None:
                seq.first_token_time = now
                prompt_logprobs = self.runner.take_prompt_logprobs(seq.request_id)
            state: OutputState = seq.output_state
            results = []
            reason = "length" if seq.params.max_tokens == 0 else None  # the prompt only (scoring): nothing sampled
            for result in [] if reason else sampled_results:
                seq.token_ids.append(result.token_id)
                results.append(result)
                reason = state.add_token(seq, result.token_id, self.max_model_len)
                if reason is not None:
                    break  # a stop among the drafts kept: those after it are dropped
            if reason is None:
                reason = self._fast_forward(seq, results)
            if reason is not None:
                state.finish()
                self.scheduler.finish(seq, reason)
                self.runner.release(seq.request_id)
                self.lookups.pop(seq.request_id, None)
                self.sequences.pop(seq.request_id, None)
                seq.finish_time = now
            outputs.append(self._output(seq, results, prompt_logprobs))
        return outputs

    def _draft(self, out) -> dict[str, int]:
        """Appends prompt-lookup drafts to the decoding sequences that take them, and schedules them with the
        sequence's next token; returns the number of drafts per request.

        Drafts pay while a step is bound by reading the weights: its rows then cost little more than one. So they
        only fill a step up to DRAFT_ROWS rows, shared evenly among its decodes; a step with a long prompt chunk,
        or with many sequences, gets none (benchmarks/prompt_lookup.py --batches). They are left out where a grammar
        decides the tokens (its state follows each token) or where they would pass max_tokens or the context."""
        candidates = [(index, seq) for index, (seq, num_new) in enumerate(out.scheduled)
                      if num_new == 1 and seq.num_tokens - seq.num_computed_tokens == 1
                      and seq.params.logits_processor is None]
        if not candidates:
            return {}
        share = min(self.config.prompt_lookup,
                    (min(DRAFT_ROWS, self.config.max_num_batched_tokens) - sum(n for _, n in out.scheduled))
                    // len(candidates))
        drafts = {}
        for index, seq in candidates if share > 0 else ():
            room = min(share, seq.params.max_tokens - seq.num_output_tokens - 1,
                       self.max_model_len - seq.num_tokens - 1)
            lookup = self.lookups.setdefault(seq.request_id, LookupIndex())
            proposed = lookup.propose(seq.token_ids, room) if room > 0 else []
            while proposed and not self.block_manager.can_append(seq, 1 + len(proposed)):
                proposed.pop()
            if proposed:
                self.block_manager.append_slots(seq, 1 + len(proposed))
                seq.token_ids.extend(proposed)
                out.scheduled[index] = (seq, 1 + len(proposed))
                drafts[seq.request_id] = len(proposed)
        return drafts

    def _fast_forward(self, seq: Sequence, results: list[SampleResult]) -> str | None:
        """Appends the tokens the sequence's grammar forces next (JSON keys, quotes, the rest of an enum value)
        without sampling them: the next step computes them together with the token after them, so a structured
        answer takes fewer steps. Returns a finish reason if one of them ends the sequence."""
        forced_tokens = getattr(seq.params.logits_processor, "forced_tokens", None)
        if forced_tokens is None or seq.params.logprobs is not None:  # logprobs need each token's own logits
            return None
        for token_id in forced_tokens(seq.output_token_ids):
            seq.token_ids.append(token_id)
            results.append(SampleResult(token_id))
            reason = seq.output_state.add_token(seq, token_id, self.max_model_len)
            if reason is not None:
                return reason
        return None

    def _output(self, seq: Sequence, results, prompt_logprobs=None) -> RequestOutput:
        state: OutputState = seq.output_state
        finished = seq.is_finished
        metrics = {
            "arrival_time": seq.arrival_time,
            "ttft_s": (seq.first_token_time - seq.arrival_time) if seq.first_token_time else None,
            "num_prompt_tokens": seq.num_prompt_tokens,
            "num_generated_tokens": seq.num_output_tokens,
            "num_preemptions": seq.num_preemptions,
        }
        if finished:
            metrics["decode_s"] = seq.finish_time - seq.first_token_time
            metrics["total_s"] = seq.finish_time - seq.arrival_time
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[r.token_id for r in results],
            new_text=state.take_new_text(finished),
            token_ids=seq.output_token_ids,
            text=state.text if finished else state.text[: state.emitted],
            finished=finished,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=[r for r in results if r.logprob is not None],
            prompt_logprobs=prompt_logprobs,
            metrics=metrics,
        )

    def prompt_logits(self, token_ids: list[int], chunk: int | None = None) -> torch.Tensor:
        """Logits at every position of token_ids, (T, V) float32, in one prefill outside the scheduler (for scoring
        and perplexity), or in chunks of `chunk` tokens that read the KV cache as later steps do (1: every token as
        a decode step). It borrows KV blocks, so call it when no requests are running."""
        if not token_ids or len(token_ids) > self.max_model_len:
            raise RequestError(f"score {len(token_ids)} tokens: need 1..{self.max_model_len}", param="token_ids")
        seq = Sequence("score", token_ids, SamplingParams())
        if not self.block_manager.can_append(seq, seq.num_tokens):
            raise RequestError("not enough free KV blocks to score this text now; wait for running requests")
        self.block_manager.append_slots(seq, seq.num_tokens)
        try:
            return self.runner.all_logits(seq, chunk)
        finally:
            self.block_manager.free(seq)

    def stats(self) -> dict:
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_usage": self.block_manager.usage,
            "num_kv_blocks": self.block_manager.num_blocks,
            "prefix_cache_hit_rate": self.block_manager.prefix_hit_rate,
            "num_steps": self.num_steps,
            "num_draft_tokens": self.num_draft_tokens,
            "num_kept_draft_tokens": self.num_kept_draft_tokens,
        }


# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_STEP_MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts (half its 64 MB heap on 64-bit systems)
_STEP_TRIM_THRESHOLD = 128 << 20


def _tune_heap() -> None:
    """Returns the load's temporaries to the OS, then tells glibc to keep what the steps free.

    Packing weights frees gigabytes of temporaries that glibc keeps in the heap unless asked to return them. Left
    to itself, glibc then serves many of the steps' tensors of a few MB (a 512-token prefill's MLP activations are
    6 MB for the 135M) by fresh mmaps, or trims its heap under them, and the kernel faults in and zeroes their
    pages again at every step: a 16-document bulk job of the 135M made 0.5-1.5 million page faults and spent
    2.7-7.3 s in the kernel. Served from the heap, with up to 128 MB of free memory kept at its top: 151,000 (the
    KV cache's first touch) and 1.7-2.4 s
    (`benchmarks/profile_decode.py --batch 16 --prompt-tokens 1500 --new-tokens 128 --all-steps`)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        libc.mallopt(_M_MMAP_THRESHOLD, _STEP_MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _STEP_TRIM_THRESHOLD)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator decides
