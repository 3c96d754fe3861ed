"""The two tokenizer back ends behind :class:`llmsh.tokenizer.Tokenizer`.

``_JsonTokenizer``: tokenizer.json (or a GPT-2 vocab.json + merges.txt pair) through Hugging Face
``tokenizers``. ``_SentencePieceTokenizer``: tokenizer.model through sentencepiece plus
tokenizer_config.json's added tokens. The rules they share (no control tokens from user text, no
EOS appended, the documented sentencepiece differences) are in :mod:`llmsh.tokenizer`'s docstring.
"""

from __future__ import annotations

from pathlib import Path

from .errors import TokenizerError
from .stream_decoder import DecodeStreamAdapter, StreamDecoder
from .tokenizer import Tokenizer, _content, split_on_tokens


def _first_line(e: Exception, default: str) -> str:
    # library errors can span many lines (Rust backtraces); one line names the problem
    return str(e).splitlines()[0] if str(e) else default


class _JsonTokenizer(Tokenizer):
    """tokenizer.json through the ``tokenizers`` library, the engine transformers itself uses."""

    def __init__(self, path: Path, tconf: dict, tk=None):
        from tokenizers import Tokenizer as HFTokenizer

        if tk is None:
            try:
                tk = HFTokenizer.from_file(str(path))
            except Exception as e:  # the Rust error type is not exported; any failure means unusable
                raise TokenizerError(f"cannot load {path}: {_first_line(e, type(e).__name__)}") from None
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
        return DecodeStreamAdapter(self._tk, skip_special, self._check_id)


class _SentencePieceTokenizer(Tokenizer):
    """tokenizer.model through sentencepiece, plus tokenizer_config's added tokens (see module doc)."""

    def __init__(self, path: Path, tconf: dict):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except Exception as e:
            raise TokenizerError(f"cannot load {path}: {_first_line(e, 'corrupt file')}") from None
        self._sp = sp
        self._n = n = sp.get_piece_size()
        pieces = sp.encode("a", out_type=str)
        self._dummy_prefix = bool(pieces) and pieces[0].startswith("▁")
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
        self._matchers: dict[bool, dict] = {}  # parse_special -> tokens split out first

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
                self._matchers.clear()

    def token_to_id(self, token):
        for i, a in self._added.items():
            if a[0] == token:
                return i
        i = self._sp.piece_to_id(token)
        return i if i < self._n and self._sp.id_to_piece(i) == token else None

    def _encode(self, text, parse_special):
        # Non-special added tokens always match, before sentencepiece sees the text (as in
        # transformers and llama.cpp's tokenizer_st_partition); special ones only when parsing markup.
        match = self._matchers.get(parse_special)
        if match is None:
            match = self._matchers[parse_special] = {
                a[0]: (i, a[2], a[3]) for i, a in self._added.items() if parse_special or not a[1]}
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
