"""Request bodies of the API, checked by pydantic (strict types, unknown fields refused).

Field names and ranges follow OpenAI's API reference (chat completions, legacy completions);
``top_k``, ``min_p`` and ``repetition_penalty`` are llmsh's (and llama.cpp's server's) extras.
A sampling field left out (None) takes the model's default from generation_config.json, as the
``llmsh`` commands do; so an unset temperature is greedy for a model that does not sample.
Fields OpenAI defines that change nothing here (``user``, ``n`` of 1, ``stream_options``...)
are accepted; others that would change the answer and are not implemented are refused.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

NonEmpty = Annotated[str, Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class LlmshOptions(_Body):
    """llmsh's own request options (the ``llmsh`` field), used by the command line's client mode:
    fit_context: cap max_tokens at what the context leaves instead of answering 400 (as
    ``llmsh generate -n`` does); details: add ``"llmsh": {token_ids, n_ctx, context_used,
    stats}`` to the reply (the last chunk when streaming)."""

    fit_context: bool = False
    details: bool = False


class _Sampling(_Body):
    model: str | None = None      # one model is served: any name is accepted
    temperature: Annotated[float, Field(ge=0)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: Union[NonEmpty, Annotated[list[NonEmpty], Field(max_length=16)], None] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    llmsh: LlmshOptions = LlmshOptions()

    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: Union[str, TokenIds, Annotated[list[str], Field(min_length=1)],
                  Annotated[list[TokenIds], Field(min_length=1)]]
    max_tokens: Annotated[int, Field(ge=0)] = 16
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    best_of: Literal[1] | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    text: str
    add_bos: bool | None = None       # default: as the tokenizer does
    parse_special: bool = False


class DetokenizeRequest(_Body):
    model: str | None = None
    ids: list[Annotated[int, Field(ge=0)]]


class PerplexityRequest(_Body):
    model: str | None = None
    text: str
    n_ctx: Annotated[int, Field(ge=4)] | None = None     # default: 512, or the model's context if shorter
    stride: Annotated[int, Field(ge=1)] | None = None
    all_tokens: bool = False
    per_token: bool = False
    top_logprobs: Annotated[int, Field(ge=1, le=20)] | None = None
