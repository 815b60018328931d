"""One streamed chat choice that may call tools: text goes out as content at once unless it may be the start of a
call; a call goes out as OpenAI streams one, its id and name first and then its arguments piece by piece, while the
model writes them.

The arguments streamed join into the text a whole answer would give (json.dumps of the parsed object), so a
client gets the same calls either way. A call is streamed only when its object names an offered function before
its arguments, and the arguments are an object; any other call (the name after the arguments, arguments written
as a JSON string) goes out whole when the choice ends, and so do the calls after it, to keep their order. A call
that repeats an earlier one word for word is held while it may still be that repeat, and dropped if it is, as a
whole answer drops it. What cannot be taken back: a streamed call that the model cuts short (max_tokens, a stop
string) or breaks (invalid JSON, only possible with tool_choice "auto", as a forced call follows a grammar) keeps
the arguments sent so far.
"""
from dataclasses import dataclass

from ironlm.json_reader import END, JsonReader
from ironlm.tools import BARE_MARKERS, HERMES_CLOSE, HERMES_OPEN, ToolSet, loads_or_none, new_call_id, partial_suffix

_FENCES = ("```json", "```")
_ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class _Draft:
    """A call object being read: what is known of it, and what of it has gone out."""
    name_text: str = ""          # the "name" member as JSON text
    name: str | None = None
    arguments_key: str | None = None
    arguments: str = ""          # the arguments object as JSON text, so far
    complete: bool = False       # the arguments object is closed
    streamable: bool = False     # named before its arguments, which are an object
    index: int | None = None     # the call's index in the choice's tool_calls, once its header went out
    sent: int = 0                # characters of `arguments` sent


class _CallReader:
    """Calls out of one JSON text: an object that is one call, or a list of call objects."""

    def __init__(self):
        self.json = JsonReader()
        self.depth: int | None = None  # path length of the call objects: 0 for one object, 1 in a list
        self.drafts: list[_Draft] = []

    def feed(self, text: str) -> None:
        for path, piece in self.json.feed(text):
            if self.depth is None:
                self.depth = 1 if piece.startswith("[") else 0
            if len(path) == self.depth and piece is not END and piece.startswith("{") and \
                    len(self.drafts) == (path[0] if self.depth else 0):
                self.drafts.append(_Draft())
            if len(path) > self.depth and self.drafts:
                self._member(self.drafts[-1], path[self.depth], len(path) == self.depth + 1, piece)

    @staticmethod
    def _member(draft: _Draft, key, own: bool, piece: str | None) -> None:
        if key == "name" and own:
            if piece is END:
                name = loads_or_none(draft.name_text)
                draft.name = name if isinstance(name, str) else None
            else:
                draft.name_text += piece
        elif key in _ARGUMENT_KEYS and draft.arguments_key in (None, key) and not draft.complete:
            if draft.arguments_key is None:
                draft.arguments_key = key
                draft.streamable = draft.name is not None and piece.startswith("{")
            if piece is END:
                draft.complete = draft.complete or own
            else:
                draft.arguments += piece


class CallStream:
    """feed() gives what to send at once; finish() what is left once the answer is complete."""

    def __init__(self, tools: ToolSet):
        self.tools = tools
        self.answer = ""
        self.num_sent = 0        # characters of the answer sent as content
        self.holding = tools.choice != "auto"  # a forced answer is calls and nothing else
        self.text_first = False  # the answer starts with text, so it is no bare JSON call
        self.calls_start: int | None = None  # where the calls begin in the answer
        self.readers: list[_CallReader] = []
        self.read_to = 0         # characters of the answer given to the readers
        self.in_block = False    # the last reader is inside a <tool_call> block
        self.bare: bool | None = None  # the answer is a bare JSON call (llama, mistral); None: not known yet
        self.next = 0            # the first draft not yet sent whole

    @property
    def drafts(self) -> list[_Draft]:
        return [draft for reader in self.readers for draft in reader.drafts]

    def feed(self, new_text: str) -> tuple[str, list[dict]]:
        """(content, tool_calls deltas) to send now."""
        self.answer += new_text
        content = self._content()
        self._read_calls()
        return content, self._deltas()

    def finish(self, last_text: str = "") -> tuple[str, list[dict], bool]:
        """(content not sent yet, tool_calls deltas not sent yet, whether the answer calls tools) once the answer
        ends with `last_text`."""
        content, deltas = self.feed(last_text)
        parsed = self.tools.parse(self.answer)
        sent = [draft for draft in self.drafts if draft.index is not None]
        for k, call in enumerate(parsed.calls):
            if k >= len(sent):
                deltas.append(call.openai(index=k))
            elif sent[k].name == call.name and call.arguments.startswith(sent[k].arguments):  # all of it went out
                rest = call.arguments[len(sent[k].arguments):]
                if rest:
                    deltas.append({"index": k, "function": {"arguments": rest}})
        called = bool(parsed.calls or sent)
        end = parsed.content_end if parsed.calls else self.calls_start if sent else len(self.answer)
        rest = content + self.answer[self.num_sent:max(end, self.num_sent)]
        return rest.rstrip() if called else rest, deltas, called

    # --- content -----------------------------------------------------------------------------------------

    def _content(self) -> str:
        if self.holding:
            return ""
        if not self.text_first:
            if _may_be_bare_call(self.answer.lstrip()):
                return ""
            self.text_first = True
        start = self.answer.find(HERMES_OPEN, max(0, self.num_sent - len(HERMES_OPEN)))
        if start >= 0:
            self.holding = True
            end = start
        else:  # keep back a tail that may grow into the marker
            end = len(self.answer) - partial_suffix(self.answer, HERMES_OPEN)
        while end > self.num_sent and self.answer[end - 1].isspace():
            end -= 1  # and the whitespace before it, which the content loses if calls follow
        text = self.answer[self.num_sent:max(end, self.num_sent)]
        self.num_sent += len(text)
        return text

    # --- calls -------------------------------------------------------------------------------------------

    def _read_calls(self) -> None:
        if self.bare is None:
            self._find_bare()
        if self.bare:
            self.readers[0].feed(self.answer[self.read_to:])
            self.read_to = len(self.answer)
            return
        while True:  # <tool_call> blocks, each one JSON text
            if not self.in_block:
                start = self.answer.find(HERMES_OPEN, self.read_to)
                if start < 0:  # the next search starts where a marker may still begin
                    self.read_to = max(self.read_to, len(self.answer) - partial_suffix(self.answer, HERMES_OPEN))
                    return
                if self.calls_start is None:
                    self.calls_start = start
                self.readers.append(_CallReader())
                self.in_block, self.read_to = True, start + len(HERMES_OPEN)
            close = self.answer.find(HERMES_CLOSE, self.read_to)
            end = close if close >= 0 else len(self.answer) - partial_suffix(self.answer, HERMES_CLOSE)
            self.readers[-1].feed(self.answer[self.read_to:max(end, self.read_to)])
            self.read_to = max(end, self.read_to)
            if close < 0:
                return
            self.in_block, self.read_to = False, close + len(HERMES_CLOSE)

    def _find_bare(self) -> None:
        # A bare call: optional marker, optional ```json fence, then the JSON text. Known once its first
        # bracket is in; a <tool_call> first, or any other text, makes it no bare call.
        head = self.answer.lstrip()
        for marker in BARE_MARKERS:
            if head.startswith(marker):
                head = head[len(marker):].lstrip()
        if any(prefix.startswith(head) for prefix in (*BARE_MARKERS, *_FENCES)):
            return  # not known yet
        for fence in _FENCES:
            if head.startswith(fence):
                head = head[len(fence):].lstrip()
                break
        if not head:
            return
        if head[0] in "{[":
            self.bare, self.calls_start = True, 0
            self.readers.append(_CallReader())
            self.read_to = len(self.answer) - len(head)
        else:
            self.bare = False

    def _deltas(self) -> list[dict]:
        """The calls' deltas that may go out now, in order: a call goes out once the ones before it went whole."""
        drafts, deltas = self.drafts, []
        sent = [d for d in drafts[:self.next] if d.index is not None]
        while self.next < len(drafts):
            draft = drafts[self.next]
            if draft.index is None:
                if not draft.streamable or draft.name not in self.tools.names or len(sent) >= self.tools.max_calls:
                    break  # this call and those after it go out when the choice ends
                earlier = [d.arguments for d in sent if d.name == draft.name]
                if any(e.startswith(draft.arguments) for e in earlier) and not draft.complete:
                    break  # it may yet repeat an earlier call
                if draft.arguments in earlier:  # it does: a whole answer drops it too
                    self.next += 1
                    continue
                draft.index = len(sent)
                deltas.append({"index": draft.index, "id": new_call_id(), "type": "function",
                               "function": {"name": draft.name, "arguments": draft.arguments}})
            elif len(draft.arguments) > draft.sent:
                deltas.append({"index": draft.index, "function": {"arguments": draft.arguments[draft.sent:]}})
            draft.sent = len(draft.arguments)
            if not draft.complete:
                break
            sent.append(draft)
            self.next += 1
        return deltas


def _may_be_bare_call(head: str) -> bool:
    if not head or head[0] in "{[`":
        return True
    return any(marker.startswith(head) or head.startswith(marker) for marker in (*BARE_MARKERS, HERMES_OPEN))
