"""Chat messages and their token ids through the model's chat template.

Special tokens: template markup is encoded with ``parse_special=True``, message contents with
``parse_special=False``, so a user typing ``<|im_end|>`` sends those characters, not the control
token. The template is rendered once more with placeholder contents to tell markup from content.
An assistant reply keeps its generated ids, re-used verbatim when the conversation is re-encoded
(so :class:`llmsh.session.ChatSession` can re-use its KV cache up to the end of the last reply).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import InputError

_MARK = re.compile("\ue000LLMSH([0-9]+)\ue001")  # private-use code points never typed in practice


@dataclass
class Message:
    """One message. ``ids``: an assistant reply's generated token ids (not saved);
    ``interrupted``: the reply was stopped by Ctrl-C and is partial."""

    role: str
    content: str
    interrupted: bool = False
    ids: list[int] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = {"role": self.role, "content": self.content}
        if self.interrupted:
            d["interrupted"] = True
        return d


def _render(model, template: str, messages: list[Message], add_generation_prompt: bool) -> str:
    from .template import render_chat

    tok = model.tokenizer
    return render_chat(template, [{"role": m.role, "content": m.content} for m in messages],
                       add_generation_prompt=add_generation_prompt,
                       bos_token=tok.bos_token, eos_token=tok.eos_token)


def encode_messages(model, messages: list[Message], *, template: str | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template (markup specials parsed,
    contents taken literally; an assistant reply re-uses its generated ids).

    model: a :class:`llmsh.loader.LoadedModel`; template: the Jinja chat template (default: the
    model's own).

    Raises TemplateError (:class:`llmsh.template.NoChatTemplateError` when there is none); InputError when the template rewrites message contents (so markup
    cannot be told from content) and a content contains special-token text.
    """
    tok = model.tokenizer
    if template is None:
        template = tok.chat_template    # None: render_chat refuses (NoChatTemplateError)
    text = _render(model, template, messages, add_generation_prompt)
    marked = [Message(m.role, f"\ue000LLMSH{i}\ue001") for i, m in enumerate(messages)]
    parts = _MARK.split(_render(model, template, marked, add_generation_prompt))
    # re.split with a group alternates markup (even) and placeholder numbers (odd).
    if sorted(int(p) for p in parts[1::2]) == list(range(len(messages))):
        # Templates print contents as they are, or trimmed (Llama 3's `| trim`).
        for fix in (None, str.strip):
            contents = [m.content if fix is None else fix(m.content) for m in messages]
            if "".join(p if i % 2 == 0 else contents[int(p)] for i, p in enumerate(parts)) != text:
                continue
            ids: list[int] = []
            for i, p in enumerate(parts):
                if i % 2 == 0:
                    ids += tok.encode(p, add_bos=False, parse_special=True) if p else []
                    continue
                m, content = messages[int(p)], contents[int(p)]
                if m.ids is not None and content == m.content:
                    ids += m.ids
                elif content:
                    ids += tok.encode(content, add_bos=False, parse_special=False)
            return ids
    for m in messages:
        if tok.encode(m.content, add_bos=False, parse_special=True) != tok.encode(
                m.content, add_bos=False, parse_special=False):
            raise InputError("a message contains special-token text, which this model's chat "
                             "template does not let llmsh keep apart from the markup")
    return tok.encode(text, add_bos=False, parse_special=True)
