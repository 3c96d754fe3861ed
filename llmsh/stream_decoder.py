"""Incremental detokenizers: token ids in, text out as soon as it is complete.

Used by :meth:`llmsh.tokenizer.Tokenizer.stream_decoder` to stream replies; joined output equals
the tokenizer's full ``decode``. Reference behaviour: vLLM's ``detokenize_incrementally`` and
``tokenizers.decoders.DecodeStream``.
"""

from __future__ import annotations


def token_pieces(tokenizer, ids) -> list[str]:
    """Each token's text such that the pieces join into ``tokenizer.decode(ids)``: a token holding
    only part of a UTF-8 character gets "" and the character goes with the token completing it
    (``llmsh tokenize --pieces`` and the server's ``/tokenize``)."""
    dec = tokenizer.stream_decoder()
    texts = [dec.step(i) for i in ids]
    if texts:
        texts[-1] += dec.flush()
    return texts


class StreamDecoder:
    """Incremental detokenizer: ``"".join(step(i) for i in ids) + flush() == decode(ids)``.

    Prefix-diff over a sliding window (as vLLM's ``detokenize_incrementally`` and
    ``tokenizers.decoders.DecodeStream`` do): decode ``ids[prefix:]``, emit what extends the
    decode of ``ids[prefix:read]`` once it does not end in an incomplete character (U+FFFD).
    Both decodes start at the same token, so a stripped leading space cancels out. Cost per
    token is one decode of a few-token window, not of the whole sequence.

    A sequence cut inside a character ends in U+FFFD after ``flush()``, and in nothing after
    ``flush(complete=True)``, which drops that incomplete tail (what the end of a reply wants:
    see :func:`complete_decode`). With a tokenizer.json
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

    def flush(self, *, complete: bool = False) -> str:
        """Return whatever is still pending and reset. A truncated character at the end is U+FFFD,
        or with ``complete`` left out: the text is then the decode of the longest prefix of the
        ids that does not end inside a character."""
        ids = self._ids
        if complete:
            out = complete_decode(self._decode, ids, keep=self._done)
        else:
            out = self._decode(ids)
        out = out[len(self._done_text):]
        self._ids, self._done, self._done_text = [], 0, ""
        return out


class DecodeStreamAdapter(StreamDecoder):
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

    def flush(self, *, complete: bool = False) -> str:
        # DecodeStream holds an incomplete character back forever; the full decode shows it as
        # U+FFFD. Diff against the last chunk's ids so a decoder's leading-space strip cancels out.
        out = ""
        if self._pending:
            dec = lambda ids: self._tk.decode(ids, skip_special_tokens=self._skip)  # noqa: E731
            base = dec(self._last)
            ids = self._last + self._pending
            full = complete_decode(dec, ids, keep=len(self._last)) if complete else dec(ids)
            out = full[len(base):]
        self.__init__(self._tk, self._skip, self._check)
        return out


# The most tokens an incomplete character can span: 3 of its at most 4 UTF-8 bytes.
MAX_INCOMPLETE_TOKENS = 3


def complete_decode(decode, ids, *, keep: int = 0) -> str:
    """``decode(ids)`` without an incomplete character at the end: the decode of the longest
    prefix of ``ids``, at most :data:`MAX_INCOMPLETE_TOKENS` shorter (and at least ``keep`` long),
    whose text does not end in U+FFFD; ``decode(ids)`` itself when there is none (bytes that are
    invalid, not incomplete: they stay visible as U+FFFD).

    A reply cut by a length limit or Ctrl-C can stop inside a multi-byte character (one byte of
    three); its decode ends in U+FFFD, which is not text the model wrote. The ids themselves stay
    the caller's (``--json`` tokens keep them). A U+FFFD earlier in the text is left alone.
    """
    ids = list(ids)
    full = decode(ids)
    if not full.endswith("\ufffd"):
        return full
    for k in range(len(ids) - 1, max(keep, len(ids) - MAX_INCOMPLETE_TOKENS) - 1, -1):
        text = decode(ids[:k])
        if not text.endswith("\ufffd"):
            return text
    return full
