"""OpenAI requests -> prompt token ids, SamplingParams and grammars; shared by the server and batch jobs."""
from ironlm import reasoning
from ironlm.grammar import GrammarCompiler
from ironlm.sampling import SampleResult, SamplingParams
from ironlm.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                    TokenizeRequest, bad_request)
from ironlm.tokenizer import Tokenizer
from ironlm.tools import ToolSet, read_tools, render_chat, tool_set


def request_tools(tok: Tokenizer, req) -> ToolSet | None:
    """The tools a chat request offers and how its answer may use them; None for none."""
    if not isinstance(req, ChatCompletionRequest) or not req.tools:
        return None
    functions, choice = read_tools([tool.model_dump(exclude_none=True) for tool in req.tools],
                                   None if req.tool_choice is None else req.tool_choice_raw())
    return tool_set(functions, choice, req.parallel_tool_calls, tok)


def request_thinking(tok: Tokenizer, req, prompts: list[list[int]]) -> bool | None:
    """For a chat request to a reasoning model (its template has </think>), whether the prompt leaves the model
    inside its thinking; None where answers are not split into reasoning and content."""
    if not isinstance(req, ChatCompletionRequest) or not reasoning.template_thinks(tok.chat_template):
        return None
    return reasoning.ids_think(tok, prompts[0])


def tokenize_request(tok: Tokenizer, req, tools: ToolSet | None = None) -> list[list[int]]:
    """Prompt token ids of a chat or completion request, one list per prompt."""
    vocab_size = tok.vocab_size
    if isinstance(req, ChatCompletionRequest):
        text = render_chat(tok, [m.plain() for m in req.messages], tools, req.chat_template_kwargs)
        return [tok.encode(text, add_special_tokens=False)]  # the template writes BOS itself
    prompts = []
    for prompt in req.prompts():
        if isinstance(prompt, str):
            prompts.append(tok.encode(prompt))
            continue
        for token_id in prompt:
            if not 0 <= token_id < vocab_size:
                raise bad_request(f"prompt token id {token_id} is outside the vocabulary "
                                  f"(0..{vocab_size - 1})", param="prompt")
        prompts.append(list(prompt))
    return prompts


def count_request_tokens(tok: Tokenizer, req: TokenizeRequest) -> list[int]:
    """/tokenize: the token ids a prompt takes, or chat messages (with tools) as a chat request renders them."""
    if req.prompt is not None:
        return tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
    chat = ChatCompletionRequest(model="default", messages=req.messages, tools=req.tools,
                                 chat_template_kwargs=req.chat_template_kwargs)
    chat.check()
    return tokenize_request(tok, chat, request_tools(tok, chat))[0]


def detokenize_request(tok: Tokenizer, req: DetokenizeRequest) -> str:
    for token_id in req.tokens:
        if not 0 <= token_id < tok.vocab_size:
            raise bad_request(f"token id {token_id} is outside the vocabulary (0..{tok.vocab_size - 1})",
                              param="tokens")
    return tok.decode(req.tokens, skip_special_tokens=False)


def request_sampling_params(req, prompt_len: int, choice: int, max_model_len: int, vocab_size: int) -> SamplingParams:
    """SamplingParams for one choice of a request, checked against the context before anything is allocated."""
    limit = max_model_len
    if prompt_len >= limit:
        raise bad_request(f"This model's maximum context length is {limit} tokens, but the prompt has "
                          f"{prompt_len} tokens; shorten it", param="messages", code="context_length_exceeded")
    max_tokens = req.requested_max_tokens() if isinstance(req, ChatCompletionRequest) else req.max_tokens
    if max_tokens is None:
        max_tokens = limit - prompt_len
    elif prompt_len + max_tokens > limit:
        raise bad_request(f"This model's maximum context length is {limit} tokens; you asked for "
                          f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to generate); "
                          f"lower max_tokens or shorten the prompt", param="max_tokens",
                          code="context_length_exceeded")
    logprobs = req.num_logprobs() if isinstance(req, ChatCompletionRequest) else req.logprobs
    echo_logprobs = logprobs if isinstance(req, CompletionRequest) and req.echo else None
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k,
        min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=None if req.seed is None else req.seed + choice,  # n choices must differ
        stop=req.stop_list(),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=echo_logprobs,
        logit_bias=req.logit_bias_ids(),
    )
    params.validate(vocab_size)
    return params


def echo_texts(tok: Tokenizer, req) -> list[str] | None:
    """The prompts as a completion with echo repeats them before its text, one per prompt; None without echo."""
    if not isinstance(req, CompletionRequest) or not req.echo:
        return None
    return [p if isinstance(p, str) else tok.decode(p, skip_special_tokens=False) for p in req.prompts()]


def grammar_source(req, tools: ToolSet | None) -> tuple[str, object] | None:
    """What the answer must follow: ("lark", a forced call's grammar, maybe with the response_format as the other
    choice), ("json", the response_format schema), or None for free text."""
    schema = None if req.response_format is None else req.response_format.schema()
    if tools is not None:
        lark = tools.grammar(schema)
        return None if lark is None else ("lark", lark)
    return None if schema is None else ("json", schema)


def compile_grammar(grammar: GrammarCompiler, source: tuple[str, object], num_choices: int,
                    tools: ToolSet | None = None) -> list:
    """One logits processor (a grammar state) per choice; blocks, so call it off an event loop."""
    kind, text = source
    if kind == "json":
        return grammar.compile(text, num_choices, "response_format")
    return tools.guarded(grammar.compile_lark(text, num_choices, "tools"), grammar.tokenizer)


class TokenTexts:
    """Each token's own text, decoded once, for the logprobs of responses."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tok.decode([token_id], skip_special_tokens=False)
        return text

    def entries(self, results: list[SampleResult]) -> list[tuple[str, float, list[tuple[str, float]]]]:
        """(token, logprob, [(top token, its logprob)...]) per sampled token: what protocol's logprobs take."""
        return [(self(r.token_id), r.logprob, [(self(t), lp) for t, lp in (r.top_logprobs or [])]) for r in results]

    def prompt_entries(self, prompt_ids: list[int], results: list[SampleResult | None]) -> list[tuple]:
        """entries of an echoed prompt: its first token has no logprob (nothing predicts it)."""
        return [(self(token_id), None, None) if r is None else self.entries([r])[0]
                for token_id, r in zip(prompt_ids, results)]
