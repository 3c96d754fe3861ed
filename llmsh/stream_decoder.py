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
