"""Chat templates rendered in a Jinja sandbox with a time and output-size budget.

Templates come with model files, so they are untrusted code. They render in jinja2's
ImmutableSandboxedEnvironment (no access to underscore attributes, no mutation of our data) set up like
transformers' (trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`, `strftime_now`, a `tojson`
that does not escape HTML), so the same template gives the same text. The budget is enforced without
threads: the sandbox's call/getattr/getitem/binop hooks, `range` and every filter check the clock, operators
that could build a huge value (`+`, `*`, `**`, `%`) check the size first, and the output is pulled chunk by
chunk from `template.generate()` and measured. The budget of the render in progress lives in a ContextVar,
so renders in different threads do not share it.
"""

import contextvars
import datetime
import json
import math
import re
import time
from dataclasses import dataclass

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.runtime import Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ironlm.errors import ModelLoadError, RequestError

TIME_BUDGET_S = 2.0
MAX_OUTPUT_CHARS = 1_000_000
_MAX_POW_BITS = 100_000


@dataclass
class _Budget:
    seconds: float
    deadline: float
    max_chars: int
    name: str

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise RequestError(f"chat template {self.name} ran past its {self.seconds:g} s time budget",
                               param="messages")

    def check_size(self, value) -> None:
        if isinstance(value, (str, list, tuple, dict)):
            self.check_length(len(value))

    def check_length(self, length: int) -> None:
        if length > self.max_chars:
            raise RequestError(
                f"chat template {self.name} builds a value of {length} items, over its {self.max_chars} budget",
                param="messages",
            )

    def check_int(self, value) -> None:
        # Widths and counts larger than the output budget only serve to allocate huge strings.
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > self.max_chars:
            raise RequestError(f"chat template {self.name} used the number {value}, over its budget", param="messages")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("ironlm_chat_template_budget", default=None)


def _check(value=None):
    budget = _BUDGET.get()
    if budget is not None:
        budget.check_time()
        budget.check_size(value)
    return value


class _BudgetedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["+", "*", "**", "%"])

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        budget = _BUDGET.get()
        if budget is not None:
            budget.check_time()
            if not isinstance(__obj, Macro):  # a macro may well take big numbers from tool schemas
                for value in (*args, *kwargs.values()):
                    budget.check_int(value)
            # jinja wraps str.format in a function of the same name (__wrapped__ is the bound method)
            fmt = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            if isinstance(fmt, str) and getattr(__obj, "__name__", "") in ("format", "format_map"):
                _check_format_widths(fmt, budget)
        return _check(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj, attribute):
        return _check(super().getattr(obj, attribute))

    def getitem(self, obj, argument):
        return _check(super().getitem(obj, argument))

    def call_binop(self, context, operator, left, right):
        budget = _BUDGET.get()
        if budget is not None:
            budget.check_time()
            _check_binop(operator, left, right, budget)
        return _check(super().call_binop(context, operator, left, right))


def _check_binop(operator: str, left, right, budget: _Budget) -> None:
    # Check the size of the result before Python builds it.
    if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        budget.check_length(len(left) + len(right))
    elif operator == "*":
        seq, count = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
            budget.check_length(len(seq) * count)
    elif operator == "**" and isinstance(left, int) and isinstance(right, int):
        if right > 0 and abs(left) > 1 and right * math.log2(abs(left)) > _MAX_POW_BITS:
            raise RequestError(f"chat template {budget.name} computes a power over its budget", param="messages")
    elif operator == "%" and isinstance(left, str):
        _check_format_widths(left, budget)


def _check_format_widths(fmt: str, budget: _Budget) -> None:
    # Widths and precisions in "%10.2f" or "{:>10}" are lengths of the string the formatting builds.
    for match in re.finditer(r"%[-+ #0]*(\d*)(?:\.(\d+))?|\{[^{}]*:([^{}]*)\}", fmt):
        for number in re.findall(r"\d+", "".join(group or " " for group in match.groups())):
            budget.check_length(int(number))


class _BudgetedRange:
    """`range` whose iteration checks the clock, so loops with no other hook still stop."""

    def __init__(self, *args):
        self._range = range(*args)
        if len(self._range) > 100_000:  # jinja's own sandbox limit
            raise RequestError(f"chat template asked for a range of {len(self._range)} items", param="messages")

    def __iter__(self):
        for i, value in enumerate(self._range):
            if i % 256 == 0:
                _check()
            yield value

    def __len__(self):
        return len(self._range)

    def __getitem__(self, index):
        return self._range[index]

    def __repr__(self):
        return repr(self._range)


def _budgeted_filter(name: str, fn):
    # Marked pass_context so jinja never calls it at compile time (constant folding runs outside any budget).
    wants = jinja2.utils._PassArg.from_obj(fn)

    @jinja2.pass_context
    def wrapper(context, *args, **kwargs):
        budget = _BUDGET.get()
        if budget is not None:
            budget.check_time()
            for value in (*args[1:], *kwargs.values()):
                budget.check_int(value)
            if name == "format" and args and isinstance(args[0], str):
                _check_format_widths(args[0], budget)
        if wants is jinja2.utils._PassArg.context:
            args = (context, *args)
        elif wants is jinja2.utils._PassArg.eval_context:
            args = (context.eval_ctx, *args)
        elif wants is jinja2.utils._PassArg.environment:
            args = (context.environment, *args)
        return _check(fn(*args, **kwargs))

    return wrapper


class _GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %}` block (it marks assistant text for training masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def _environment() -> _BudgetedSandbox:
    # optimized=False: the optimizer folds constant expressions while compiling, outside any budget.
    env = _BudgetedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag],
                           optimized=False)
    env.filters = {key: _budgeted_filter(key, fn) for key, fn in env.filters.items()}
    env.filters["tojson"] = _budgeted_filter("tojson", _tojson)
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, range=_BudgetedRange)
    return env


def template_variables(source: str) -> frozenset[str]:
    """The variables a template reads from its caller ("messages", "tools", ...); parsing runs no template code.
    Empty if the template does not parse (compile_template reports that)."""
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(_environment().parse(source)))
    except jinja2.TemplateSyntaxError:
        return frozenset()


def compile_template(source: str, name: str, error=ModelLoadError) -> jinja2.Template:
    """Compile a chat template in the budgeted sandbox; `error` (ModelLoadError or RequestError) on bad syntax."""
    env = _environment()
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise error(f"chat template {name} has a syntax error at line {e.lineno}: {e.message}; "
                    "fix or replace the template") from None


def plain_messages(messages) -> list[dict]:
    """Validate chat messages and copy them to plain JSON data; RequestError(param="messages") if malformed.

    A message is a dict with a str "role" and a "content" that is a str or a list of text parts
    ({"type": "text", "text": str}); parts are joined with "\\n" into one string, as most templates expect a
    string. Content may be None or absent only on an assistant message with "tool_calls". Keys whose value
    is None are dropped (templates test for presence), as transformers does.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    result = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'", param="messages")
        message = {key: plain_data(value) for key, value in message.items() if value is not None}
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(
                    f"messages[{i}].content must be a string or a list of {{type: 'text', text: str}} parts",
                    param="messages",
                )
            message["content"] = "\n".join(p["text"] for p in content)
        elif not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise RequestError(f"messages[{i}].content must be a string or a list of text parts", param="messages")
        result.append(message)
    return result


def plain_data(value):
    """`value` rebuilt from plain JSON types only, so a template sees no object with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(v) for v in value]
    if isinstance(value, str):  # subclasses (enums, ...) can carry methods of their own
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    return f"<{type(value).__name__}>"


def render(template: jinja2.Template, name: str, variables: dict, time_budget_s: float = TIME_BUDGET_S,
           max_chars: int = MAX_OUTPUT_CHARS) -> str:
    """Render `template` with `variables` inside the budget; RequestError if it fails or runs over.

    The size budget is `max_chars` plus four times the size of the variables, so long messages still fit.
    """
    max_chars += 4 * len(json.dumps(variables, default=str))
    budget = _Budget(time_budget_s, time.monotonic() + time_budget_s, max_chars, name)
    token = _BUDGET.set(budget)
    chunks = []
    num_chars = 0
    try:
        for chunk in template.generate(**variables):
            num_chars += len(chunk)
            if num_chars > max_chars:
                raise RequestError(f"chat template {name} output is over {max_chars} characters", param="messages")
            budget.check_time()
            chunks.append(chunk)
    except RequestError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise RequestError(f"chat template {name} tried something unsafe and was stopped: {e}",
                           param="messages") from None
    except jinja2.exceptions.TemplateError as e:
        raise RequestError(f"chat template {name} refused the messages: {e}", param="messages") from None
    except (MemoryError, RecursionError):
        raise RequestError(f"chat template {name} ran out of memory or recursion depth", param="messages") from None
    except Exception as e:  # the template is untrusted code: whatever it raises is about this request
        raise RequestError(f"chat template {name} failed on these messages: {type(e).__name__}: {e}",
                           param="messages") from None
    finally:
        _BUDGET.reset(token)
    return "".join(chunks)
