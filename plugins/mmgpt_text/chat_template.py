"""Jinja chat templates, rendered as Hugging Face ``transformers`` renders them.

A pretrained chat model's ``tokenizer_config.json`` (or ``chat_template.jinja``) holds a Jinja
template that turns ``messages`` (``[{"role": ..., "content": ...}, ...]``) into the exact text
the model was trained on. Templates come from model repositories, so they are untrusted code:
they run in Jinja's :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` (no attribute access
to Python internals, no mutation of the arguments) with caps on the size of what they compute
and render (:data:`MAX_VALUE`, :data:`MAX_EXPONENT`, :data:`MAX_OUTPUT`), and with the same settings and helpers as
``transformers`` (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``,
``strftime_now``, a ``tojson`` that keeps non-ASCII characters, ``{% generation %}`` blocks).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

MIN_JINJA = (3, 1, 6)  # older versions have known sandbox escapes
# Resource caps (the sandbox alone limits what a template can reach, not how much it computes):
# no operation may build a string or list longer than MAX_VALUE, no power may use an exponent
# above MAX_EXPONENT, and a rendering stops past MAX_OUTPUT characters.
MAX_VALUE = 1_000_000
MAX_EXPONENT = 256
MAX_OUTPUT = 4_000_000


class ChatTemplateError(ValueError):
    """A chat template failed to compile or to render (its own ``raise_exception`` included)."""


def _jinja() -> Any:
    try:
        import jinja2
    except ImportError as exc:
        raise ImportError('chat templates need Jinja2: pip install "jinja2>=3.1.6"') from exc
    version = tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit())
    if version < MIN_JINJA:
        raise ImportError(
            f"chat templates need jinja2>=3.1.6 (older versions have sandbox escapes), found "
            f'{jinja2.__version__}: pip install -U "jinja2>=3.1.6"'
        )
    return jinja2


def _size(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple)) else None


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse an operation whose result would exceed the caps (checked before computing it)."""
    if operator == "**":
        if isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
            raise ChatTemplateError(f"the chat template computes a power above {MAX_EXPONENT}")
        return
    sizes = (_size(left), _size(right))
    if operator == "*":
        size, times = (sizes[0], right) if sizes[0] is not None else (sizes[1], left)
        if size is not None and isinstance(times, int) and size * times > MAX_VALUE:
            raise ChatTemplateError(f"the chat template builds a value over {MAX_VALUE} long")
    elif operator == "+" and None not in sizes and sizes[0] + sizes[1] > MAX_VALUE:
        raise ChatTemplateError(f"the chat template builds a value over {MAX_VALUE} long")


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> Any:
    """The compiled template (cached by source); :class:`ChatTemplateError` on a syntax error."""
    if not isinstance(source, str) or not source.strip():
        raise ChatTemplateError(f"a chat template must be a non-empty string, got {source!r}")
    jinja2 = _jinja()
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}…{% endgeneration %}`` (transformers' marker of assistant text):
        rendered as its body; labels are found by rendering prefix by prefix instead."""

        tags = {"generation"}  # noqa: RUF012 (Jinja's own class attribute)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """The sandbox, with ``*``, ``**`` and ``+`` checked before they compute: a template
        cannot make a huge string (``'a' * 10**11``) or number (``9**9**9``)."""

        intercepted_binops = frozenset({"*", "**", "+"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _check_binop(operator, left, right)
            return super().call_binop(context, operator, left, right)

    env = BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"the chat template does not compile: {exc.message} (line {exc.lineno})"
        ) from exc


def render_chat_template(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    special_tokens: Mapping[str, str | None] | None = None,
    **kwargs: Any,
) -> str:
    """``messages`` rendered by the template ``source``.

    ``special_tokens`` (``{"bos_token": "<s>", ...}``) become template variables as in
    ``transformers`` (those that are ``None`` stay undefined, so they render as nothing);
    ``kwargs`` are further variables (``tools``, ``enable_thinking``, ...).
    """
    template = compile_chat_template(source)
    jinja2 = _jinja()
    variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    variables.update(kwargs)
    try:
        chunks, length = [], 0
        for chunk in template.generate(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **variables,
        ):
            length += len(chunk)
            if length > MAX_OUTPUT:
                raise ChatTemplateError(f"the chat template renders more than {MAX_OUTPUT} chars")
            chunks.append(chunk)
        return "".join(chunks)
    except (jinja2.exceptions.TemplateError, TypeError) as exc:
        raise ChatTemplateError(f"the chat template failed: {exc}") from exc


__all__ = ["ChatTemplateError", "compile_chat_template", "render_chat_template"]
