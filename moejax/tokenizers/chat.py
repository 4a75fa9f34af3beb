"""Chat templates rendered as transformers renders them (utils/chat_template_utils.py): jinja2's
ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loopcontrols extension, a
`tojson` that keeps non-ASCII text, `raise_exception`, `strftime_now`; the variables are `messages`,
`add_generation_prompt`, `tools`, `documents` and the tokenizer's special tokens (bos_token, ...).
Messages keep only keys whose value is not None (as transformers normalizes them). The rendered text
is tokenized without special tokens (the template writes them), as vLLM and transformers do."""

from __future__ import annotations

import datetime
import functools
import json

from moejax.errors import UserError


class ChatTemplateError(ValueError):
    """The template could not render these messages (raise_exception, or a jinja error)."""


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse: {e.message} (line {e.lineno})") from None


@functools.lru_cache(maxsize=8)
def content_format(template: str) -> str:
    """"openai" when the template loops over a message's content (it takes the list of parts as
    given), else "string" (parts are joined with newlines first): vLLM's detection, on jinja's AST."""
    import jinja2
    from jinja2 import nodes

    try:
        ast = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.exceptions.TemplateSyntaxError:
        return "string"
    for loop in ast.find_all(nodes.For):
        it = loop.iter
        if (isinstance(it, nodes.Getitem) and isinstance(it.arg, nodes.Const) and it.arg.value == "content") or (
                isinstance(it, nodes.Getattr) and it.attr == "content"):
            return "openai"
    return "string"


def check_template(template: str, where: str) -> None:
    """A one-line UserError for a template that does not parse (--chat-template FILE)."""
    try:
        _compile(template)
    except ChatTemplateError as e:
        raise UserError(f"{where}: {e}") from None


def render(template: str, messages: list[dict], special: dict, add_generation_prompt: bool = True,
           **kwargs) -> str:
    """The prompt text of `messages` (dicts with role and content)."""
    import jinja2

    msgs = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return _compile(template).render(messages=msgs, add_generation_prompt=add_generation_prompt, tools=None,
                                         documents=None, **{**special, **kwargs})
    except jinja2.exceptions.TemplateError as e:  # raise_exception, undefined attribute, sandbox refusal
        raise ChatTemplateError(f"the chat template refused these messages: {str(e)[:200]}") from None
    except (TypeError, ValueError, KeyError, IndexError, RecursionError) as e:
        raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {str(e)[:200]}") \
            from None
