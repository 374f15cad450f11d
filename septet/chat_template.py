"""Chat templates: the jinja2 source a checkpoint carries, rendered in a sandbox.

Templates come from checkpoint files, so they are untrusted: we render them with jinja2's
ImmutableSandboxedEnvironment (no attribute access to internals, no mutation of the
messages), with the same options and helpers HF transformers gives them (trim_blocks,
lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text, the
`{% generation %}` block tag).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from .errors import SeptetError

# ChatML (<|im_start|>role\ncontent<|im_end|>\n), for models that ship no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_TEMPLATE = CHATML_TEMPLATE


class ChatTemplateError(SeptetError):
    """A chat template that does not compile, or fails while rendering."""


class _TemplateRaised(Exception):
    pass


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _generation_extension():
    """`{% generation %}...{% endgeneration %}`: HF transformers' marker around assistant text (it
    uses it to build assistant-token masks). We only render the body, in its own scope as HF does."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return GenerationTag


@lru_cache(maxsize=1)
def _env():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _generation_extension()])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=32)
def _compile(template: str, name: str):
    import jinja2

    try:
        return _env().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template {name}: syntax error at line {e.lineno}: {e.message}; "
                                "fix the template or pass another one") from None


def render_chat(template: str | None, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", name: str = "", **extra: Any) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) with a jinja2 chat template.

    template=None uses ChatML. `name` (e.g. the checkpoint path) appears in error messages.
    """
    import jinja2

    label = f"'{name}'" if name else "(inline)"
    if template is None:
        template = DEFAULT_TEMPLATE
    if not isinstance(template, str):
        raise ChatTemplateError(f"chat template {label} is a {type(template).__name__}, not a string")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    compiled = _compile(template, label)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token, **extra)
    except _TemplateRaised as e:
        raise ChatTemplateError(f"chat template {label} rejected the conversation: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template {label} failed: {_one_line(e)}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError) as e:
        raise ChatTemplateError(
            f"chat template {label} failed at {_where(e)}: {type(e).__name__}: {_one_line(e)}"
        ) from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _where(e: BaseException) -> str:
    tb = e.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return f"line {line}" if line else "render time"


__all__ = ["CHATML_TEMPLATE", "DEFAULT_TEMPLATE", "ChatTemplateError", "render_chat"]
