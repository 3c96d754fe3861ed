"""Chat templates: render a model's jinja ``chat_template`` exactly as transformers does.

Reference: transformers' ``apply_chat_template(..., tokenize=False)``
(``utils/chat_template_utils.py``): jinja2 ``ImmutableSandboxedEnvironment`` with
``trim_blocks=True, lstrip_blocks=True`` and the ``loopcontrols`` extension; globals
``raise_exception`` and ``strftime_now``; a ``tojson`` filter that does not HTML-escape
(``ensure_ascii=False`` and ``indent``/``separators``/``sort_keys`` options); a ``namespace`` that
refuses underscore names. Templates come from the Hub and are untrusted: the sandbox refuses
access to Python internals (``__class__``, ``__globals__``, ...), and the template's
``messages`` are rebuilt from plain JSON types before rendering.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from .errors import TemplateError

#: ChatML (``<|im_start|>role\ncontent<|im_end|>\n``, then ``<|im_start|>assistant\n`` as the
#: generation prompt), the built-in ``--chat-template chatml``: widely understood by
#: instruction-tuned models, and the markers are ordinary text for a tokenizer that lacks them.
#: Never used unasked: a model without a chat template (a base model) is refused in chat mode,
#: since ChatML markup it never saw makes it answer in garbage. The BOS token is not written
#: here: ``Tokenizer.encode`` adds it according to ``add_bos``.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FALLBACK_TEMPLATE = CHATML_TEMPLATE  # the old name

#: Names ``--chat-template`` takes besides a file (``./chatml`` for a file of that name).
BUILTIN_TEMPLATES = {"chatml": CHATML_TEMPLATE}

NO_TEMPLATE = "has no chat template (it is a base model?)"


class NoChatTemplateError(TemplateError):
    """Chat mode asked of a model without a chat template. Exit status 2: the fix is an option
    (``--raw``, ``--chat-template FILE``), as for a usage error."""

    exit_code = 2


def _raise_exception(message):
    raise TemplateError(f"chat template: {message}")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson HTML-escapes '<', '>', '&' and "'", which would change the prompt text
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _plain(value):
    """Rebuild template data from exact JSON types, so no object with extra methods reaches the sandbox."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


class _TemplateDict:
    # transformers' TemplateDict: ``dict(...)`` in templates without exposing the dict type itself
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


_dict = _TemplateDict()


@lru_cache(maxsize=1)
def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Namespace(jinja2.utils.Namespace):
        # as transformers' TemplateNamespace: no underscore attributes (no route to CPython internals)
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _dict
    return env


@lru_cache(maxsize=32)
def _compile(template: str):
    import jinja2

    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template has a syntax error on line {e.lineno}: {e.message}") from None


def render_chat(template: str | None, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None, **extra) -> str:
    """Render ``messages`` ([{"role": str, "content": str}, ...]) with a jinja chat template.

    template: the model's ``chat_template`` string (None: NoChatTemplateError, never a guess).
    Variables seen by the template, as transformers passes them: ``messages``,
    ``add_generation_prompt``, ``tools``/``documents`` (None unless given in ``extra``),
    ``bos_token``/``eos_token`` (only when not None) and any ``extra`` keyword (e.g.
    ``unk_token``, ``pad_token``, ``enable_thinking``). Compiled templates are cached by string.

    Raises TemplateError when the template is missing or invalid, calls ``raise_exception`` (e.g. roles not
    alternating), or tries something the sandbox forbids.
    """
    import jinja2

    if template is None:
        raise NoChatTemplateError(f"the model {NO_TEMPLATE}")
    compiled = _compile(template)
    variables = {"tools": None, "documents": None}
    if bos_token is not None:
        variables["bos_token"] = bos_token
    if eos_token is not None:
        variables["eos_token"] = eos_token
    variables.update(extra)
    variables = _plain(variables)
    # as transformers: keys whose value is None are dropped (templates handle a missing key better)
    if not all(isinstance(m, dict) for m in messages):
        raise TemplateError("chat messages must be dicts with 'role' and 'content'")
    msgs = [{k: v for k, v in m.items() if v is not None} for m in _plain(list(messages))]
    try:
        return compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                               **variables)
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"chat template tried something unsafe: {e}") from None
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template failed: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError) as e:
        raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


def read_chat_template(source: str) -> str:
    """The chat template named by ``--chat-template``: a built-in name (:data:`BUILTIN_TEMPLATES`),
    a Jinja file (``.jinja``, ``.txt``, any name), or a JSON file with a ``chat_template`` key (a
    ``tokenizer_config.json``; a list of named templates gives its ``default``). The template is
    compiled here, so a syntax error is reported before any model loads.

    Raises TemplateError naming the file: missing or unreadable, not UTF-8, a JSON file without a
    usable ``chat_template``, a Jinja syntax error (with its line number).
    """
    if source in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[source]
    try:
        with open(source, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TemplateError(f"cannot read the chat template {source}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TemplateError(f"the chat template {source} is not UTF-8 (byte {e.start})") from None
    if source.lower().endswith(".json"):
        text = _from_json(source, text)
    if not text.strip():
        raise TemplateError(f"the chat template {source} is empty")
    try:
        _compile(text)
    except TemplateError as e:
        raise TemplateError(f"{source}: {e}") from None
    return text


def _from_json(source: str, text: str) -> str:
    try:
        conf = json.loads(text)
    except json.JSONDecodeError as e:
        raise TemplateError(f"{source} is not valid JSON (line {e.lineno}: {e.msg})") from None
    t = conf.get("chat_template") if isinstance(conf, dict) else None
    if isinstance(t, list):  # named templates: transformers uses "default" when no tools are given
        t = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}.get("default")
    if not isinstance(t, str) or not t:
        raise TemplateError(f"{source} has no \"chat_template\" string")
    return t
