"""Render an HF chat template (Jinja) exactly as transformers' ``apply_chat_template`` does.

transformers 5 renders a model's chat template (``tokenizer.chat_template``) in a Jinja
``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension and a ``{% generation %}`` block tag; it overrides the ``tojson``
filter (no HTML escaping, ``ensure_ascii=False``, ``indent`` / ``separators`` / ``sort_keys``)
and adds the globals ``raise_exception``, ``strftime_now``, ``dict`` and a ``namespace`` that
refuses underscore attributes. The variables are ``messages`` (plain dicts, keys whose value is
``None`` dropped), ``tools``, ``documents``, ``add_generation_prompt``, the tokenizer's named
special tokens as strings (``bos_token``, ``eos_token``, ``unk_token``, ``sep_token``,
``pad_token``, ``cls_token``, ``mask_token``; only those set) and any extra keyword arguments
(``enable_thinking``, ``date_string``...), which override the special tokens.

:class:`ChatTemplate` builds that same environment so fastrm needs no transformers at run time;
``tests/models/test_chat_template.py`` checks the token ids against transformers itself.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Mapping, Optional, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplate", "SPECIAL_TOKEN_VARIABLES", "message_to_dict"]

#: The named special tokens transformers passes to every chat template (when set).
SPECIAL_TOKEN_VARIABLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                           "cls_token", "mask_token")


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers uses it to mark assistant text for
    ``return_assistant_tokens_mask``; rendering keeps the body unchanged, so here it is a no-op
    (without the tag, templates that use it would not even parse)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
            separators: Optional[tuple] = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` / ``dict.fromkeys(...)`` inside templates, without exposing the type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` refusing underscore-prefixed attributes (no route to internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja's own signature trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def message_to_dict(message: Any) -> dict:
    """A torchtune ``Message`` (text only) or a mapping -> the plain dict a template sees (keys
    whose value is ``None`` dropped, as transformers does)."""
    if isinstance(message, Mapping):
        return {k: v for k, v in message.items() if v is not None}
    if getattr(message, "contains_media", False):
        raise ValueError(f"message with role {message.role!r} contains media; only text is supported")
    return {"role": message.role, "content": message.text_content}


class ChatTemplate:
    """A compiled chat template.

    Args:
        source: the Jinja template text.
        special_tokens: named special tokens (``bos_token`` ... ``mask_token``) -> their text;
            passed to the template as variables.
        template_kwargs: extra template variables (e.g. ``{"enable_thinking": False}`` for Qwen3,
            ``{"date_string": "26 Jul 2024"}`` for Llama 3.x); they override special tokens, as
            keyword arguments of ``apply_chat_template`` do. ``tools`` / ``documents`` go to the
            variables of those names.

    Raises:
        ValueError: the template does not parse (the Jinja error is included).
    """

    def __init__(self, source: str, special_tokens: Optional[Mapping[str, str]] = None,
                 template_kwargs: Optional[Mapping[str, Any]] = None) -> None:
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ValueError(f"chat template does not parse (line {e.lineno}): {e.message}") from e
        self.source = source
        variables = {k: str(v) for k, v in (special_tokens or {}).items() if v is not None}
        variables.update(template_kwargs or {})
        self._tools = variables.pop("tools", None)
        self._documents = variables.pop("documents", None)
        self.variables = variables

    def render(self, messages: Sequence[Any], add_generation_prompt: bool = False) -> str:
        """The conversation as text (``apply_chat_template(messages, tokenize=False)``).

        Raises:
            ValueError: the template raised (``raise_exception``, a Jinja error): the message says
                which template check failed.
        """
        msgs = [message_to_dict(m) for m in messages]
        try:
            return self._template.render(
                messages=msgs, tools=self._tools, documents=self._documents,
                add_generation_prompt=add_generation_prompt, **self.variables)
        except (jinja2.exceptions.TemplateError, TypeError) as e:
            roles = [m.get("role") for m in msgs]
            raise ValueError(f"the chat template refused this conversation (roles {roles}): {e}") from e
