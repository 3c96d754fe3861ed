"""One tokenizer interface over Hugging Face ``tokenizers`` (tokenizer.json) and sentencepiece (tokenizer.model).

Reference behaviour: transformers' ``AutoTokenizer`` on the same folder and llama.cpp's
``llama_tokenize``. Two rules hold for both back ends:

* User text is never turned into control tokens: ``encode(text)`` treats ``"<|im_end|>"`` typed
  by a user as plain text, like llama.cpp with ``parse_special=false`` (and transformers with
  ``split_special_tokens=True``). Non-special added tokens still match, as in both references.
  ``parse_special=True`` turns special tokens in the text into their ids (chat-template markup).
* EOS is never appended by ``encode`` (a prompt must not end in EOS); BOS is prepended when
  ``add_bos`` says so.

sentencepiece specifics (documented differences): plain text is encoded by sentencepiece itself,
which llama.cpp's SPM tokenizer reproduces. transformers 5.x converts tokenizer.model on the fly to
a ``Metaspace`` pre-tokenizer that does not prepend "▁" to text that already starts with a space,
so for text with leading whitespace it drops one space (``" Hi"`` encodes like ``"Hi"``); we keep
sentencepiece's (and llama.cpp's) ids there. With ``parse_special=True`` every text chunk between
special tokens gets its own dummy-prefix space (llama.cpp, transformers ``legacy=True``).
Decoding follows transformers' Llama decoder (``▁``→space, byte fallback, strip one leading space).
Invalid UTF-8 from byte pieces becomes U+FFFD by Python's ``errors="replace"`` rule.
"""

from __future__ import annotations

import re
from pathlib import Path

from .config import read_json_object
from .errors import InputError, TokenizerError
from .stream_decoder import StreamDecoder

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _content(tok) -> str | None:
    # tokenizer_config.json stores tokens either as strings or as serialized AddedToken dicts
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) and tok else None


def _as_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


class Tokenizer:
    """Encode/decode for a model folder; build with :meth:`from_dir`.

    Attributes: ``vocab_size`` (int, including added tokens), ``bos_token``/``bos_token_id``,
    ``eos_token``/``eos_token_ids`` (generation_config.json's ``eos_token_id`` list, then the
    tokenizer's EOS, then config.json's, de-duplicated), ``pad_token_id``, ``unk_token``,
    ``add_bos`` (transformers' decision: tokenizer_config ``add_bos_token``, else whether the
    tokenizer.json post-processor adds BOS, else True for sentencepiece as for Llama),
    ``add_eos`` (informational only: encode never appends EOS), ``chat_template`` (str or None;
    ``chat_template_source``: the ``--chat-template`` FILE that replaced it, else None),
    ``special_tokens_map`` (name -> token string, as transformers passes to chat templates).
    """

    vocab_size: int
    bos_token: str | None = None
    bos_token_id: int | None = None
    eos_token: str | None = None
    eos_token_ids: list[int]
    unk_token: str | None = None
    pad_token_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    chat_template_source: str | None = None  # --chat-template's FILE when it replaced the model's

    @classmethod
    def from_dir(cls, model_dir) -> "Tokenizer":
        """Load tokenizer.json (preferred), else tokenizer.model, plus the JSON side files.

        Raises TokenizerError for a missing folder, no usable tokenizer file, or a corrupt file.
        """
        d = Path(model_dir)
        if not d.is_dir():
            raise TokenizerError(f"tokenizer folder not found: {d}")
        tconf = read_json_object(d / "tokenizer_config.json", TokenizerError)
        smap = read_json_object(d / "special_tokens_map.json", TokenizerError)
        gconf = read_json_object(d / "generation_config.json", TokenizerError)
        mconf = read_json_object(d / "config.json", TokenizerError)
        # imported here: the back ends subclass Tokenizer, so they import this module
        from .tokenizer_backends import _JsonTokenizer, _SentencePieceTokenizer

        if (d / "tokenizer.json").is_file():
            tok = _JsonTokenizer(d / "tokenizer.json", tconf)
        elif (d / "tokenizer.model").is_file():
            tok = _SentencePieceTokenizer(d / "tokenizer.model", tconf)
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            tok = _JsonTokenizer.from_gpt2_files(d / "vocab.json", d / "merges.txt", tconf)
        else:
            raise TokenizerError(f"no tokenizer.json or tokenizer.model in {d}")
        tok._setup_specials(tconf, smap, gconf, mconf)
        tok.chat_template = _load_template(d, tconf)
        return tok

    # --- shared set-up -------------------------------------------------------------------
    def _setup_specials(self, tconf: dict, smap: dict, gconf: dict, mconf: dict) -> None:
        names = {}
        for key in _SPECIAL_KEYS:
            names[key] = _content(tconf.get(key)) if key in tconf else _content(smap.get(key))
        defaults = self._default_specials()
        for key in _SPECIAL_KEYS:
            if names[key] is None and key not in tconf and key not in smap:
                names[key] = defaults.get(key)
        ids = {k: (self.token_to_id(v) if v is not None else None) for k, v in names.items()}
        # no tokenizer file names it (not even as null): take config.json / generation_config.json's id
        for key, cfg_key in (("bos_token", "bos_token_id"), ("pad_token", "pad_token_id")):
            if ids[key] is None and key not in tconf and key not in smap:
                cid = next((c[cfg_key] for c in (gconf, mconf) if isinstance(c.get(cfg_key), int)), None)
                if cid is not None and 0 <= cid < self.vocab_size:
                    ids[key], names[key] = cid, self.id_to_piece(cid)
        self.bos_token, self.bos_token_id = names["bos_token"], ids["bos_token"]
        self.eos_token, self.unk_token = names["eos_token"], names["unk_token"]
        self.pad_token_id = ids["pad_token"]
        eos: list[int] = []
        for cand in (_as_list(gconf.get("eos_token_id")), [ids["eos_token"]], _as_list(mconf.get("eos_token_id"))):
            eos += [i for i in cand if i is not None and 0 <= i < self.vocab_size and i not in eos]
        self.eos_token_ids = eos
        if self.eos_token is None and eos:
            self.eos_token = self.id_to_piece(eos[0])
        add_bos = tconf.get("add_bos_token")
        self.add_bos = bool(add_bos if isinstance(add_bos, bool) else self._default_add_bos())
        self.add_bos = self.add_bos and self.bos_token_id is not None
        self.add_eos = bool(tconf.get("add_eos_token", False))
        self.special_tokens_map = {k: v for k, v in names.items() if v is not None}
        v5_extra = tconf.get("extra_special_tokens") or []  # transformers 5.x name; a list or a dict
        extra = [*(tconf.get("additional_special_tokens") or smap.get("additional_special_tokens") or []),
                 *(v5_extra.values() if isinstance(v5_extra, dict) else v5_extra)]
        self._register_specials([t for t in (_content(x) for x in [*names.values(), *extra]) if t])

    def _default_specials(self) -> dict:
        return {}

    def _default_add_bos(self) -> bool:
        return False

    def _register_specials(self, contents: list[str]) -> None:
        """Make sure the named special tokens are matched by ``parse_special`` (back-end hook)."""

    # --- public API (implemented by the back ends) -----------------------------------------
    def encode(self, text: str, *, add_bos: bool | None = None, parse_special: bool = False) -> list[int]:
        """Text -> token ids (list[int]).

        add_bos: None uses ``self.add_bos``; True/False forces it (no-op without a BOS token).
        parse_special: False (default, for user text) encodes special-token strings as plain text;
        True maps them to their ids, as transformers' tokenizer does with the template's markup.
        """
        ids = self._encode(text, parse_special)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids, *, skip_special: bool = False) -> str:
        """Token ids -> text (as transformers' ``decode`` with ``clean_up_tokenization_spaces=False``).

        Raises InputError for an id outside ``[0, vocab_size)``.
        """
        ids = [int(i) for i in ids]
        for i in ids:
            self._check_id(i)
        return self._decode(ids, skip_special)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary string of one id (raw piece: "▁the", "Ġthe", "<0x0A>"). InputError if out of range."""
        self._check_id(int(token_id))
        return self._piece(int(token_id))

    def stream_decoder(self, *, skip_special: bool = False) -> StreamDecoder:
        """A fresh :class:`StreamDecoder` whose joined output equals ``decode(ids, skip_special=...)``."""
        return StreamDecoder(self.decode, skip_special)

    def _check_id(self, i: int) -> None:
        if not 0 <= i < self.vocab_size:
            raise InputError(f"token id {i} is out of range (vocabulary size {self.vocab_size})")

    def token_to_id(self, token: str) -> int | None:  # pragma: no cover - back ends override
        raise NotImplementedError

    def _encode(self, text: str, parse_special: bool) -> list[int]:  # pragma: no cover
        raise NotImplementedError

    def _decode(self, ids: list[int], skip_special: bool) -> str:  # pragma: no cover
        raise NotImplementedError

    def _piece(self, i: int) -> str:  # pragma: no cover
        raise NotImplementedError


def _load_template(d: Path, tconf: dict) -> str | None:
    """chat_template.jinja (transformers 5.x layout) wins over tokenizer_config.json's ``chat_template``."""
    f = d / "chat_template.jinja"
    if f.is_file():
        try:
            return f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read {f}: {e}") from None
    t = tconf.get("chat_template")
    if isinstance(t, list):  # named templates: transformers uses "default" when no tools are given
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default")
    return t if isinstance(t, str) and t else None


def split_on_tokens(text: str, tokens: dict[str, tuple[int, bool, bool]]):
    """Split ``text`` around whole occurrences of ``tokens`` (longest first).

    tokens: content -> (id, lstrip, rstrip). Yields ``str`` chunks and ``int`` ids; lstrip/rstrip
    eat the whitespace before/after a match as transformers' AddedToken does.
    """
    if not tokens:
        yield text
        return
    pat = re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
    pos, strip_next = 0, False
    for m in pat.finditer(text):
        tid, lstrip, rstrip = tokens[m.group()]
        chunk = text[pos:m.start()]
        if strip_next:
            chunk = chunk.lstrip()
        if lstrip:
            chunk = chunk.rstrip()
        if chunk:
            yield chunk
        yield tid
        pos, strip_next = m.end(), rstrip
    chunk = text[pos:]
    if strip_next:
        chunk = chunk.lstrip()
    if chunk:
        yield chunk
