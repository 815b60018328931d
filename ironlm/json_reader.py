"""A JSON reader that takes its text a piece at a time, as a model writes it, and writes the value out again as it
goes: the pieces it gives back join into `json.dumps(json.loads(text), ensure_ascii=False)`.

Streamed tool calls need it: their arguments go out while the model is still writing them, and the client must get
the same text a whole answer would have (tools.ToolSet.parse writes arguments with json.dumps). Each piece comes
with its path, the keys and indices that lead to the value it belongs to, so that a caller can pick out the pieces
of one member, such as a call's "arguments".
"""
import json

_SPACE = " \t\n\r"
_HEX = frozenset("0123456789abcdefABCDEF")
_STRUCTURE = '{}[],:"'
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}

Path = tuple  # keys (str) and indices (int) from the top value down
END = None    # the text of an event that says the value at its path is complete


class JsonReader:
    """Reads one JSON value. feed() returns events (path, text): text is a piece of the value written out again,
    or END once the value at path is complete. A container's own pieces ("{", keys, ": ", ", ", "}") have the
    container's path; a member's pieces have the member's. At the first text that is not JSON, or follows the
    complete value, `failed` is set and nothing more is read; the events given before it stand."""

    def __init__(self):
        self.stack: list[list] = []  # open containers, outermost first: [kind "{" or "[", key or index]
        self.expect = "value"        # "value" | "key" | "colon" | "comma": what comes next outside a token
        self.first = False           # the innermost container was just opened, so it may close at once
        self.done = False            # the top value is complete
        self.failed = False
        self.string: list[str] | None = None  # chars of the string being read
        self.is_key = False          # that string is a key
        self.key = ""                # the key's chars given out so far
        self.escape: str | None = None        # an escape sequence being read, from its backslash
        self.high: str | None = None          # a high surrogate waiting for its low half
        self.bare: str | None = None           # a number or literal being read
        self.events: list = []

    def feed(self, text: str) -> list:
        self.events = []
        for char in text:
            if self.done and char not in _SPACE:
                self.failed = True  # text after the value; the value stands
            if self.failed:
                break
            self._char(char)
        self._flush_string()
        return self.events

    # --- one character -----------------------------------------------------------------------------------

    def _char(self, char: str) -> None:
        if self.string is not None:
            self._string_char(char)
        elif self.bare is not None and char not in _SPACE and char not in _STRUCTURE:
            self.bare += char
        else:
            if self.bare is not None:
                self._end_bare()
            if char not in _SPACE and not self.failed:
                self._structure(char)

    def _structure(self, char: str) -> None:
        expect = self.expect
        closing = "}" if self.stack and self.stack[-1][0] == "{" else "]"
        if char == closing and self.stack and (expect == "comma" or self.first and expect in ("key", "value")):
            path = self._container_path()
            self._piece(path, char)
            self.stack.pop()
            self._end_value(path)
        elif expect == "value" and char in "{[":
            path = self._path()
            self._piece(path, char)
            self.stack.append([char, None if char == "{" else 0])
            self.expect, self.first = ("key" if char == "{" else "value"), True
        elif expect in ("value", "key") and char == '"':
            self.string, self.is_key, self.first = [], expect == "key", False
            self._piece(self._container_path() if self.is_key else self._path(), '"')
        elif expect == "value" and char not in _STRUCTURE:
            self.bare, self.first = char, False
        elif expect == "colon" and char == ":":
            self._piece(self._container_path(), ": ")
            self.expect = "value"
        elif expect == "comma" and char == ",":
            self._piece(self._container_path(), ", ")
            top = self.stack[-1]
            if top[0] == "[":
                top[1] += 1
            self.expect = "key" if top[0] == "{" else "value"
        else:
            self.failed = True

    def _string_char(self, char: str) -> None:
        if self.escape is not None:
            self.escape += char
            if self.escape[1] == "u":
                if len(self.escape) > 2 and char not in _HEX:
                    self.failed = True
                elif len(self.escape) == 6:
                    self._decoded(chr(int(self.escape[2:], 16)))
                    self.escape = None
            elif self.escape[1] in _ESCAPES:
                self._decoded(_ESCAPES[self.escape[1]])
                self.escape = None
            else:
                self.failed = True
        elif char == "\\":
            self.escape = char
        elif char == '"':
            self._end_string()
        elif char < " ":  # json.loads refuses raw control characters in strings
            self.failed = True
        else:
            self._decoded(char)

    def _decoded(self, char: str) -> None:
        # a surrogate pair written as two escapes is one character
        if self.high is not None:
            high, self.high = self.high, None
            if "\udc00" <= char <= "\udfff":
                char = (high + char).encode("utf-16", "surrogatepass").decode("utf-16")
            else:
                self.string.append(high)
        if "\ud800" <= char <= "\udbff":
            self.high = char
        else:
            self.string.append(char)

    # --- ends of values ----------------------------------------------------------------------------------

    def _end_string(self) -> None:
        if self.high is not None:
            self.string.append(self.high)
            self.high = None
        self._flush_string()
        self.string = None
        if self.is_key:
            self._piece(self._container_path(), '"')
            self.stack[-1][1], self.key = self.key, ""
            self.expect = "colon"
        else:
            path = self._path()
            self._piece(path, '"')
            self._end_value(path)

    def _flush_string(self) -> None:
        # the chars read so far go out escaped, as json.dumps escapes them
        if self.string:
            text = "".join(self.string)
            if self.is_key:
                self.key += text
            path = self._container_path() if self.is_key else self._path()
            self._piece(path, json.dumps(text, ensure_ascii=False)[1:-1])
            self.string.clear()

    def _end_bare(self) -> None:
        bare, self.bare = self.bare, None
        try:
            value = json.loads(bare)
        except ValueError:
            self.failed = True
            return
        path = self._path()
        self._piece(path, json.dumps(value))
        self._end_value(path)

    def _end_value(self, path: Path) -> None:
        self.events.append((path, END))
        self.first = False
        if self.stack:
            self.expect = "comma"
        else:
            self.done = True

    # --- paths -------------------------------------------------------------------------------------------

    def _path(self) -> Path:
        """The path of the value being read."""
        return tuple(entry[1] for entry in self.stack)

    def _container_path(self) -> Path:
        return tuple(entry[1] for entry in self.stack[:-1])

    def _piece(self, path: Path, text: str) -> None:
        if self.events and self.events[-1][0] == path and self.events[-1][1] is not END:
            self.events[-1] = (path, self.events[-1][1] + text)
        else:
            self.events.append((path, text))
