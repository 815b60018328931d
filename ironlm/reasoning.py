"""Reasoning models' thinking, told apart from their answer: the text up to `</think>` becomes a chat message's
`reasoning_content` (the field DeepSeek's API and vLLM use), the rest its `content`.

DeepSeek-R1's distilled Llama and Qwen models, QwQ and Qwen3 think between `<think>` and `</think>`. Newer
templates end the prompt with `<think>`, so the answer starts inside the thinking and only the closing tag
appears; older ones leave the opening tag to the model. A template that never mentions the tags turns this off,
so other models' answers pass through whole.
"""
from ironlm.tools import partial_suffix

OPEN, CLOSE = "<think>", "</think>"


def template_thinks(template: str | None) -> bool:
    """Whether a chat template is a reasoning model's, whose answers may hold thinking."""
    return template is not None and CLOSE in template


def prompt_thinks(prompt: str) -> bool:
    """Whether a rendered prompt leaves the model inside its thinking (it ends with the opening tag)."""
    return prompt.rstrip().endswith(OPEN)


def ids_think(tokenizer, prompt_ids: list[int]) -> bool:
    """prompt_thinks for a prompt given as token ids (its last few tokens hold the tag)."""
    return prompt_thinks(tokenizer.decode(prompt_ids[-8:], skip_special_tokens=False))


def split(answer: str, thinking: bool) -> tuple[str | None, str]:
    """(reasoning, content) of a whole answer, each without leading whitespace; reasoning is None where the answer
    holds no thinking. `thinking`: the prompt left the model inside it (prompt_thinks). An answer cut off before
    `</think>` is all reasoning."""
    body = answer.lstrip()
    if body.startswith(OPEN):
        body, thinking = body[len(OPEN):].lstrip(), True
    if not thinking:
        return None, body
    end = body.find(CLOSE)
    if end < 0:
        return body, ""
    return body[:end], body[end + len(CLOSE):].lstrip()


class Stream:
    """One streamed answer, split as `split` splits it whole: `feed` gives the (reasoning, content) to send now,
    holding back leading whitespace and a tail that may be the start of a tag; `finish` gives what is held."""

    def __init__(self, thinking: bool):
        self.thinking = thinking
        self.state = "start"  # then "think" or "answer"
        self.skip_space = True  # at the start of a part, whose leading whitespace is dropped
        self.pending = ""

    def feed(self, new_text: str) -> tuple[str, str]:
        self.pending += new_text
        reasoning = content = ""
        while True:
            if self.skip_space:
                self.pending = self.pending.lstrip()
                if not self.pending:
                    return reasoning, content
                self.skip_space = False
            if self.state == "start":
                if OPEN.startswith(self.pending) and self.pending != OPEN:
                    return reasoning, content  # may be an opening tag: wait
                if self.pending.startswith(OPEN):
                    self.thinking, self.pending, self.skip_space = True, self.pending[len(OPEN):], True
                self.state = "think" if self.thinking else "answer"
            elif self.state == "answer":
                return reasoning, content + self._take(len(self.pending))
            else:
                end = self.pending.find(CLOSE)
                if end < 0:
                    return reasoning + self._take(len(self.pending) - partial_suffix(self.pending, CLOSE)), content
                reasoning += self._take(end)
                self.pending, self.state, self.skip_space = self.pending[len(CLOSE):], "answer", True

    def finish(self) -> tuple[str, str]:
        """What is held back once the answer is complete: (reasoning, content)."""
        rest, self.pending = self.pending, ""
        return (rest, "") if self.thinking and self.state != "answer" else ("", rest)

    def _take(self, n: int) -> str:
        text, self.pending = self.pending[:n], self.pending[n:]
        return text
