"""A conversation with one KV cache reused across turns (the engine behind ``llmsh chat``).

Each turn renders the whole conversation with the model's chat template, encodes it, finds the
longest common prefix with the token ids already in the cache, trims the cache back to it and
prefills only the rest: the prompt-cache reuse of llama.cpp's server and mlx-lm's
``cache_prompt``. Generated reply ids are kept and re-used verbatim when the conversation is
re-encoded, so a follow-up turn normally re-uses everything up to the end of the last reply.

How messages become token ids (markup vs. literal contents) is :mod:`llmsh.messages`; the
saved-conversation file format is :mod:`llmsh.conversation_io`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

from .conversation_io import SAVE_FORMAT, is_saved_conversation, read_conversation, write_conversation
from .errors import InputError, TemplateError
from .messages import Message, encode_messages

# Re-exported: callers import these from here (cli_common, tests).
__all__ = ["ChatSession", "Message", "encode_messages", "common_prefix", "is_saved_conversation",
           "SAVE_FORMAT", "DEFAULT_N_CTX_CAP"]

DEFAULT_N_CTX_CAP = 8192  # default context when the model allows more: caps KV-cache memory


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatSession:
    """A chat with ``model`` (a :class:`llmsh.loader.LoadedModel`) and one :class:`KVCache`.

    Args:
        system: the system message (kept apart from ``messages``; never dropped on overflow).
        params: :class:`llmsh.sampling.SamplingParams`; a seed seeds one generator for the whole
            session, so the same inputs in the same order give the same replies. Without a seed
            the session chooses one (:func:`llmsh.sampling.random_seed`, in :attr:`params`);
            ``set_params(seed=None)`` then makes it unseeded.
        max_tokens: reply length limit (tokens; None: until EOS or the context is full). When old
            exchanges are dropped to fit the context, :attr:`reserve` positions stay free for the reply.
        n_ctx: context size in tokens (default: the model's, capped at DEFAULT_N_CTX_CAP).
        notice: called with one-line notices (dropped exchanges).
        on_prefill(done, total): progress of each turn's prefill (tokens; see
            :func:`llmsh.generate.prefill`).

    Raises:
        InputError: ``n_ctx`` is not in [1, the model's max_position_embeddings].
        NoChatTemplateError: the model has no chat template (give one: set
            ``model.tokenizer.chat_template``, as ``--chat-template`` does).
    """

    def __init__(self, model, *, system: str | None = None, params=None, max_tokens: int | None = None,
                 n_ctx: int | None = None, notice: Callable[[str], None] | None = None,
                 on_prefill: Callable[[int, int], None] | None = None):
        from .sampling import SamplingParams

        self.model = model
        self.system = system or None
        self.params = params if params is not None else SamplingParams()
        if self.params.seed is None:  # one seed per session, shown by /show: a chat can be replayed
            from .sampling import random_seed
            self.params = replace(self.params, seed=random_seed())
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        limit = int(model.config.max_position_embeddings)
        self.n_ctx = int(n_ctx) if n_ctx is not None else min(limit, DEFAULT_N_CTX_CAP)
        if self.n_ctx > limit:  # the same words as generate's; the lower bound is chat's option's
            raise InputError(f"--n-ctx {self.n_ctx} is larger than the model's context ({limit} tokens)")
        if self.n_ctx < 1:
            raise InputError(f"--n-ctx {self.n_ctx} must be at least 1")
        self.notices: list[str] = []
        self._notice = notice or self.notices.append
        self.on_prefill = on_prefill
        self.messages: list[Message] = []
        self.cache = model.decoder.new_cache(self.n_ctx)
        self.cache_ids: list[int] = []  # the ids whose keys/values fill cache[:offset]
        self.last_stats = None
        self.template = model.tokenizer.chat_template
        if self.template is None:  # a base model: ChatML it never saw would make it answer garbage
            from .template import NO_TEMPLATE, NoChatTemplateError
            raise NoChatTemplateError(f"the model {NO_TEMPLATE}")
        self._generator = None
        self.context_full = False  # the last reply stopped because the context was full
        self.last_interrupt: str | None = None  # what Ctrl-C left of the last reply: see _stream
        self._saved = (None, [])  # what was last saved or loaded: see :attr:`modified`
        # Called with this session after each reply has ended (complete or interrupted, the reply
        # the last message): the conversation log's hook (llmsh.cli.logs.ChatLogger).
        self.on_reply: Callable[["ChatSession"], None] | None = None

    # --- conversation editing -------------------------------------------------------------------

    def set_params(self, **changes) -> None:
        """Change sampling parameters (SamplingParams fields) and/or ``max_tokens``.

        Raises InputError naming the parameter and its allowed range."""
        if "max_tokens" in changes:
            mt = changes.pop("max_tokens")
            if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
                raise InputError(f"max_tokens must be an integer >= 1, got {mt!r}")
            self.max_tokens = mt
        if changes:
            try:
                self.params = replace(self.params, **changes)
            except (ValueError, TypeError) as e:
                raise InputError(str(e)) from None
            if "seed" in changes:
                self._generator = None

    def set_system(self, text: str | None) -> None:
        """Set (or with None/empty, remove) the system message; the cache adapts on the next turn."""
        self.system = text or None

    def clear(self) -> None:
        """Start a new conversation (the system message stays)."""
        self.messages.clear()
        self.cache.reset()
        self.cache_ids = []

    def undo(self) -> Message:
        """Drop the last exchange (user message and its reply); return the user message.

        Raises InputError when there is nothing to undo."""
        if not self.messages:
            raise InputError("nothing to undo")
        while self.messages and self.messages[-1].role != "user":
            self.messages.pop()
        return self.messages.pop() if self.messages else Message("user", "")

    # --- generation -----------------------------------------------------------------------------

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the reply as text pieces; stats land in ``last_stats``.

        Raises InputError for an empty message or one that cannot fit in the context (the
        message is then not kept). The reply is generated as the iterator is consumed; Ctrl-C
        or ``close()`` stops it (see :meth:`_stream`).
        """
        if not text or not text.strip():
            raise InputError("empty message")
        self.messages.append(Message("user", text))
        return self._reply(on_nothing=self.messages.pop, nothing="message dropped")

    def regen(self) -> Iterator[str]:
        """Drop the last reply and stream a new one. Raises InputError when there is none."""
        if not self.messages or self.messages[-1].role != "assistant":
            raise InputError("nothing to regenerate: the conversation has no reply yet")
        old = self.messages.pop()
        return self._reply(on_nothing=lambda: self.messages.append(old), nothing="previous reply kept")

    def _reply(self, on_nothing: Callable[[], object], nothing: str) -> Iterator[str]:
        # Fitting happens before the generator starts so that InputError is raised by send().
        self.last_interrupt = None
        self.context_full = False
        try:
            ids = self._fit()
        except BaseException:
            on_nothing()
            raise
        return self._stream(ids, on_nothing, nothing)

    def _stream(self, ids: list[int], on_nothing, nothing: str) -> Iterator[str]:
        """Generate the reply to ``ids`` (the full prompt) reusing the cache.

        KeyboardInterrupt while generating (or ``close()`` of this iterator) stops the reply: the
        partial reply is kept with ``interrupted=True`` (:attr:`last_interrupt` "partial reply
        kept"), or, if nothing was generated yet, the conversation is left as it was before the
        call (``nothing``: "message dropped" for :meth:`send`, "previous reply kept" for
        :meth:`regen`); the cache is trimmed to what is valid, and the KeyboardInterrupt
        propagates. A reply that ran out of context positions (not of ``max_tokens``) sets
        :attr:`context_full`.
        """
        from .generate import GenerationStats, generate_tokens
        from .sampling import make_generator
        from .stream_decoder import complete_decode

        reuse = min(common_prefix(self.cache_ids, ids), len(ids) - 1)
        self.cache.trim(min(reuse, self.cache.offset))
        self.cache_ids = ids[:reuse]
        if self.params.seed is not None and self._generator is None:
            self._generator = make_generator(self.params.seed, self.model.device)
        stats = self.last_stats = GenerationStats()
        max_new = self.n_ctx - len(ids)
        if self.max_tokens is not None:
            max_new = min(self.max_tokens, max_new)
        tok = self.model.tokenizer
        tokens = generate_tokens(self.model.decoder, ids[reuse:], self.cache, self.params,
                                 max_new_tokens=max_new, eos_ids=tok.eos_token_ids, stats=stats,
                                 context_ids=ids[:reuse], generator=self._generator,
                                 on_prefill=self.on_prefill)
        decoder = tok.stream_decoder(skip_special=True)
        reply_ids: list[int] = []
        pieces: list[str] = []
        done = False
        try:
            for t in tokens:
                reply_ids.append(t)
                piece = decoder.step(t)
                if piece:
                    pieces.append(piece)
                    yield piece
            piece = decoder.flush(complete=True)  # a character cut by the length limit is not text
            if piece:
                pieces.append(piece)
                yield piece
            done = True
        finally:
            tokens.close()
            # The cache holds a prefix of prompt + reply (generate.py's invariant); keep its ids.
            full = ids + reply_ids
            self.cache.trim(min(self.cache.offset, len(full)))
            self.cache_ids = full[: self.cache.offset]
            if not done:
                stats.finish_reason = "interrupted"
            elif stats.finish_reason == "length" and len(full) >= self.n_ctx:
                self.context_full = True
            if done or reply_ids:
                content = "".join(pieces) if done else complete_decode(
                    lambda i: tok.decode(i, skip_special=True), reply_ids)
                self.messages.append(Message("assistant", content, interrupted=not done, ids=reply_ids))
                if not done:
                    self.last_interrupt = "partial reply kept"
                if self.on_reply is not None:
                    self.on_reply(self)
            else:
                on_nothing()
                self.last_interrupt = nothing

    # --- encoding and context -------------------------------------------------------------------

    def _all(self, messages=None) -> list[Message]:
        msgs = list(self.messages if messages is None else messages)
        return ([Message("system", self.system)] if self.system else []) + msgs

    def encode(self, messages: list[Message], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` through this session's template: see :func:`encode_messages`."""
        return encode_messages(self.model, messages, template=self.template,
                               add_generation_prompt=add_generation_prompt)

    @property
    def reserve(self) -> int:
        """Positions kept free for the reply when fitting the conversation (tokens):
        max_tokens (a quarter of the context when unlimited), at most half the context."""
        want = self.n_ctx // 4 if self.max_tokens is None else self.max_tokens
        return max(1, min(want, self.n_ctx // 2))

    def _fit(self) -> list[int]:
        """Prompt ids of the conversation, dropping the oldest exchanges until it fits."""
        budget = self.n_ctx - self.reserve
        last = self.messages[-1]
        alone = len(self.encode(self._all([last])))
        if alone > budget:
            what = "message" if self.system is None else "message with the system message"
            raise InputError(f"{what} too long for the context: {alone} tokens, but at most {budget} fit "
                             f"(n_ctx {self.n_ctx} minus {self.reserve} kept for the reply)")
        dropped = 0
        while True:
            ids = self.encode(self._all())
            if len(ids) <= budget:
                break
            # Drop the oldest exchange: the first message and everything up to the next user message.
            del self.messages[0]
            while len(self.messages) > 1 and self.messages[0].role != "user":
                del self.messages[0]
            dropped += 1
        if dropped:
            self._notice(f"dropped the {dropped} oldest exchange{'s' if dropped > 1 else ''} "
                         f"to fit the context ({self.n_ctx} tokens)")
        return ids

    @property
    def context_used(self) -> int:
        """Context in use (tokens): the whole conversation as the template renders it (system
        message, every message including the last reply with its end-of-turn markup; no
        generation prompt). The next turn's prompt starts with exactly these tokens, so this is
        what the context must hold, whatever the KV cache holds now (it lags by the reply's
        end-of-turn tokens, and is stale after /load or /system). ``/show`` and the ``--stats``
        line both report this number."""
        msgs = self._all()
        if not msgs:
            return 0
        try:
            return len(self.encode(msgs, add_generation_prompt=False))
        except (TemplateError, InputError):
            return self.cache.offset

    # --- persistence ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"format": SAVE_FORMAT, "version": 1, "model": str(self.model.path),
                "system": self.system, "messages": [m.to_dict() for m in self.messages]}

    def save(self, path, *, force: bool = False) -> Path:
        """Write the conversation to ``path``: see :func:`llmsh.conversation_io.write_conversation`
        (atomic; a new file is private; a foreign file is only replaced with ``force``).

        Raises InputError when the file cannot be written, or exists, is not a saved
        conversation and ``force`` is false."""
        path = write_conversation(path, self.to_dict(), force=force)
        self._saved = self._snapshot()
        return path

    def _snapshot(self):
        return self.system, [m.to_dict() for m in self.messages]

    @property
    def modified(self) -> bool:
        """True when the conversation has messages that differ from the last :meth:`save` or
        :meth:`load` (or, with neither yet, from the empty conversation): replacing it loses work."""
        return bool(self.messages) and self._snapshot() != self._saved

    def load(self, path) -> None:
        """Replace the conversation (system message and messages) with one saved by :meth:`save`.

        Raises InputError when the file is missing, not JSON, or not a saved conversation."""
        self.restore(*read_conversation(path))

    def restore(self, system: str | None, messages: list[Message]) -> None:
        """Replace the conversation with ``system`` and ``messages`` (from a file or the log),
        counted as unmodified; the next turn re-encodes it all (one prefill rebuilds the cache)."""
        self.system, self.messages = system or None, list(messages)
        self._saved = self._snapshot()
