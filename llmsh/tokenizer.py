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

import json
import re
from pathlib import Path

from .errors import InputError, TokenizerError

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"cannot read {path}: expected a JSON object")
    return data


def _content(tok) -> str | None:
    # tokenizer_config.json stores tokens either as strings or as serialized AddedToken dicts
    if isinstance(tok, dict):
        tok = tok.get("content")
    return tok if isinstance(tok, str) and tok else None


def _as_list(v) -> list[int]:
    if v is None:
        return []
    return [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]


class StreamDecoder:
    """Incremental detokenizer: ``"".join(step(i) for i in ids) + flush() == decode(ids)``.

    Prefix-diff over a sliding window (as vLLM's ``detokenize_incrementally`` and
    ``tokenizers.decoders.DecodeStream`` do): decode ``ids[prefix:]``, emit what extends the
    decode of ``ids[prefix:read]`` once it does not end in an incomplete character (U+FFFD).
    Both decodes start at the same token, so a stripped leading space cancels out. Cost per
    token is one decode of a few-token window, not of the whole sequence.

    A sequence cut inside a character ends in U+FFFD after ``flush()``. With a tokenizer.json
    byte-fallback decoder, whose full decode replaces every byte of an invalid ``<0xNN>`` run,
    complete characters of that last run that were already streamed stay as they were.
    """

    def __init__(self, decode, skip_special: bool = False):
        self._decode = lambda ids: decode(ids, skip_special=skip_special)
        self._ids: list[int] = []  # window: ids of the last emitted chunk, then pending ids
        self._done = 0  # how many ids at the window's start belong to the last emitted chunk
        self._done_text = ""  # decode(self._ids[:self._done])

    def step(self, token_id: int) -> str:
        """Add one token id; return the text newly complete ("" while a character is pending)."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        if len(text) <= len(self._done_text) or text.endswith("\ufffd"):
            return ""
        out = text[len(self._done_text):]
        # slide: the ids just emitted become the next window's prefix
        self._ids = self._ids[self._done:]
        self._done = len(self._ids)
        self._done_text = self._decode(self._ids)
        return out

    def flush(self) -> str:
        """Return whatever is still pending (possibly U+FFFD for a truncated character) and reset."""
        out = self._decode(self._ids)[len(self._done_text):]
        self._ids, self._done, self._done_text = [], 0, ""
        return out


class _DecodeStreamAdapter(StreamDecoder):
    """``tokenizers.decoders.DecodeStream`` behind the StreamDecoder interface (exact for tokenizer.json)."""

    def __init__(self, tk, skip_special: bool, check=None):
        from tokenizers.decoders import DecodeStream

        self._tk = tk
        self._skip = skip_special
        self._check = check
        self._ds = DecodeStream(skip_special_tokens=skip_special)
        self._last: list[int] = []  # ids behind the last emitted chunk: context for flush()
        self._pending: list[int] = []

    def step(self, token_id: int) -> str:
        if self._check is not None:
            self._check(int(token_id))
        self._pending.append(int(token_id))
        out = self._ds.step(self._tk, int(token_id))
        if out is None:
            return ""
        self._last, self._pending = self._pending, []
        return out

    def flush(self) -> str:
        # DecodeStream holds an incomplete character back forever; the full decode shows it as
        # U+FFFD. Diff against the last chunk's ids so a decoder's leading-space strip cancels out.
        out = ""
        if self._pending:
            dec = lambda ids: self._tk.decode(ids, skip_special_tokens=self._skip)  # noqa: E731
            base = dec(self._last)
            out = dec(self._last + self._pending)[len(base):]
        self.__init__(self._tk, self._skip, self._check)
        return out


class Tokenizer:
    """Encode/decode for a model folder; build with :meth:`from_dir`.

    Attributes: ``vocab_size`` (int, including added tokens), ``bos_token``/``bos_token_id``,
    ``eos_token``/``eos_token_ids`` (generation_config.json's ``eos_token_id`` list, then the
    tokenizer's EOS, then config.json's, de-duplicated), ``pad_token_id``, ``unk_token``,
    ``add_bos`` (transformers' decision: tokenizer_config ``add_bos_token``, else whether the
    tokenizer.json post-processor adds BOS, else True for sentencepiece as for Llama),
    ``add_eos`` (informational only: encode never appends EOS), ``chat_template`` (str or None),
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

    @classmethod
    def from_dir(cls, model_dir) -> "Tokenizer":
        """Load tokenizer.json (preferred), else tokenizer.model, plus the JSON side files.

        Raises TokenizerError for a missing folder, no usable tokenizer file, or a corrupt file.
        """
        d = Path(model_dir)
        if not d.is_dir():
            raise TokenizerError(f"tokenizer folder not found: {d}")
        tconf = _read_json(d / "tokenizer_config.json")
        smap = _read_json(d / "special_tokens_map.json")
        gconf = _read_json(d / "generation_config.json")
        mconf = _read_json(d / "config.json")
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
        return StreamDecoder(self._decode_checked, skip_special)

    def _decode_checked(self, ids, skip_special=False):
        return self.decode(ids, skip_special=skip_special)

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


class _JsonTokenizer(Tokenizer):
    """tokenizer.json through the ``tokenizers`` library, the engine transformers itself uses."""

    def __init__(self, path: Path, tconf: dict, tk=None):
        from tokenizers import Tokenizer as HFTokenizer

        if tk is None:
            try:
                tk = HFTokenizer.from_file(str(path))
            except Exception as e:  # the Rust error type is not exported; any failure means unusable
                raise TokenizerError(f"cannot load {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        self._tk = tk
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_gpt2_files(cls, vocab: Path, merges: Path, tconf: dict) -> "_JsonTokenizer":
        """A GPT-2 style folder with only vocab.json + merges.txt: byte-level BPE as GPT2Tokenizer builds it."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        try:
            tk = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as e:
            raise TokenizerError(f"cannot load {vocab} / {merges}: {e}") from None
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(tconf.get("add_prefix_space", False)))
        tk.decoder = decoders.ByteLevel()
        return cls(vocab, tconf, tk)

    def _register_specials(self, contents):
        # transformers registers bos/eos/unk/pad/additional tokens as special added tokens even
        # when tokenizer.json lists them only in the model vocabulary
        from tokenizers import AddedToken

        added = {t.content for t in self._tk.get_added_tokens_decoder().values()}
        new = [AddedToken(c, special=True, normalized=False) for c in dict.fromkeys(contents)
               if c not in added and self._tk.token_to_id(c) is not None]
        if new:
            self._tk.add_special_tokens(new)
            self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)

    def _default_add_bos(self) -> bool:
        # Whether the post-processor (e.g. Llama's TemplateProcessing "<s> $A") prepends BOS
        with_special = self._tk.encode("a", add_special_tokens=True).ids
        plain = self._tk.encode("a", add_special_tokens=False).ids
        if len(with_special) <= len(plain) or with_special[: len(plain)] == plain:
            return False
        if self.bos_token_id is None:
            self.bos_token_id = with_special[0]
            self.bos_token = self._piece(with_special[0])
        return with_special[0] == self.bos_token_id

    def token_to_id(self, token):
        return self._tk.token_to_id(token)

    def _encode(self, text, parse_special):
        # encode_special_tokens=True makes the added-vocabulary pass skip special tokens, so they
        # are tokenized as ordinary text (llama.cpp parse_special=false; transformers split_special_tokens)
        self._tk.encode_special_tokens = not parse_special
        return self._tk.encode(text, add_special_tokens=False).ids

    def _decode(self, ids, skip_special):
        return self._tk.decode(ids, skip_special_tokens=skip_special)

    def _piece(self, i):
        return self._tk.id_to_token(i) or ""

    def stream_decoder(self, *, skip_special: bool = False) -> StreamDecoder:
        return _DecodeStreamAdapter(self._tk, skip_special, self._check_id)


class _SentencePieceTokenizer(Tokenizer):
    """tokenizer.model through sentencepiece, plus tokenizer_config's added tokens (see module doc)."""

    def __init__(self, path: Path, tconf: dict):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except Exception as e:
            raise TokenizerError(f"cannot load {path}: {str(e).splitlines()[0] if str(e) else 'corrupt file'}") from None
        self._sp = sp
        self._n = n = sp.get_piece_size()
        self._dummy_prefix = sp.encode("a", out_type=str)[:1] != [] and sp.encode("a", out_type=str)[0].startswith("▁")
        # id -> (content, special, lstrip, rstrip)
        self._added: dict[int, tuple[str, bool, bool, bool]] = {}
        for k, v in (tconf.get("added_tokens_decoder") or {}).items():
            c = _content(v)
            if c is not None and str(k).isdigit():
                v = v if isinstance(v, dict) else {}
                self._added[int(k)] = (c, bool(v.get("special", True)), bool(v.get("lstrip")), bool(v.get("rstrip")))
        self.vocab_size = max([n, *(i + 1 for i in self._added)])
        self._special = {i for i in range(n) if sp.IsControl(i) or sp.IsUnknown(i)}
        self._special |= {i for i, a in self._added.items() if a[1]}
        self._bytes: dict[int, bytes] = {}

    def _default_specials(self):
        sp = self._sp
        pairs = (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id()))
        return {k: sp.id_to_piece(i) for k, i in pairs if i >= 0}

    def _default_add_bos(self):
        return True  # LlamaTokenizer's default, and llama.cpp's for SPM vocabularies

    def _register_specials(self, contents):
        for c in contents:
            i = self.token_to_id(c)
            if i is not None and i not in self._added:
                self._added[i] = (c, True, False, False)
                self._special.add(i)

    def token_to_id(self, token):
        for i, a in self._added.items():
            if a[0] == token:
                return i
        i = self._sp.piece_to_id(token)
        return i if i < self._n and self._sp.id_to_piece(i) == token else None

    def _encode(self, text, parse_special):
        # Added tokens the sentencepiece model lacks always match (as non-special added tokens do
        # in transformers and llama.cpp); special ones only when parsing markup.
        match = {a[0]: (i, a[2], a[3]) for i, a in self._added.items()
                 if (a[1] and parse_special) or (not a[1] and i >= self._n)}
        ids: list[int] = []
        for part in split_on_tokens(text, match):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids += self._sp.encode(part)
        return ids

    def _token_bytes(self, i: int) -> bytes:
        b = self._bytes.get(i)
        if b is None:
            if i in self._added:
                b = self._added[i][0].encode("utf-8")
            elif self._sp.IsByte(i):
                b = bytes([int(self._sp.id_to_piece(i)[3:5], 16)])
            else:
                b = self._sp.id_to_piece(i).replace("▁", " ").encode("utf-8")
            self._bytes[i] = b
        return b

    def _decode(self, ids, skip_special):
        data = b"".join(self._token_bytes(i) for i in ids if not (skip_special and i in self._special))
        text = data.decode("utf-8", errors="replace")
        # transformers' Llama decoder ends with Strip(" ", left=1): the dummy prefix's space goes
        if self._dummy_prefix and text.startswith(" "):
            text = text[1:]
        return text

    def _piece(self, i):
        return self._added[i][0] if i in self._added else self._sp.id_to_piece(i)
