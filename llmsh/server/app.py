"""The Starlette app: routes, Bearer-token check, body limits, OpenAI-shaped errors.

Endpoints (OpenAI's shapes where OpenAI defines them): ``GET /health``, ``GET /v1/models``,
``POST /v1/chat/completions``, ``POST /v1/completions``, and llmsh's own ``POST /tokenize``,
``POST /detokenize``, ``POST /perplexity``. Every error is ``{"error": {"message", "type",
"param", "code"}}``: 400 unusable input (not JSON, not UTF-8, a prompt too long for the
context), 401 a missing or wrong API key, 404 an unknown path, 405 a wrong method, 413 a body
over the limit, 422 a body that does not match the schema (unknown field, wrong type, out of
range), 503 a full queue (with ``Retry-After``); a bug is a 500 with one line, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

import anyio
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..errors import LlmshError
from . import generation, schemas
from .errors import APIError
from .worker import ModelWorker

log = logging.getLogger("llmsh.server")

MAX_BODY_BYTES = 8 << 20   # a whole context of token ids as JSON is well under 1 MiB


def _json_constant(name):
    raise ValueError(f"{name} is not a JSON number")


async def read_body(request: Request, model: type[BaseModel], limit: int) -> BaseModel:
    """The request body as ``model``: at most ``limit`` bytes of UTF-8 JSON.

    Raises APIError 413 (too large), 400 (not UTF-8, not JSON, not an object), 422 (schema).
    """
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise APIError(413, f"the request body is {size} bytes, more than the limit of {limit}",
                       code="request_too_large")
    chunks, n = [], 0
    try:
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise APIError(413, f"the request body is more than the limit of {limit} bytes",
                               code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the body") from None
    raw = b"".join(chunks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})",
                       code="invalid_utf8") from None
    try:
        data = json.loads(text, parse_constant=_json_constant)
    except ValueError as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    if "\\ud" in text.lower():
        # A \uD800-\uDFFF escape not paired into one character is text no UTF-8 can hold.
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the request body has a lone surrogate (\\uD800-\\uDFFF escape): "
                           "it is not valid Unicode text", code="invalid_utf8") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _schema_error(e) from None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _schema_error(e: ValidationError) -> APIError:
    # A union reports one error per branch, with the branch's name in the location: keep the
    # deepest (the branch that got furthest) and drop branch names, which mean nothing to a client.
    errors = e.errors(include_url=False)
    err = max(errors, key=lambda x: len(x["loc"]))
    loc = [str(p) for p in err["loc"]
           if not (isinstance(p, str) and (not p.isidentifier() or p in _TYPE_TAGS))]
    param = ".".join(loc) or None
    if err["type"] == "extra_forbidden":
        msg = f"unknown field {param!r}"
        if "." not in (param or ""):
            msg += " (not an OpenAI field llmsh implements)"
    elif err["type"] == "missing":
        msg = f"missing required field {param!r}"
    else:
        msg = f"{param}: {err['msg']}" if param else err["msg"]
    return APIError(422, msg, param=param, code=err["type"])


def _handle(fn):
    """Route wrapper: APIError and llmsh's input errors become their responses; anything else is
    a 500 with one line (logged), never a traceback in the reply."""
    async def endpoint(request: Request):
        try:
            return await fn(request)
        except APIError as e:
            return e.response()
        except LlmshError as e:
            return APIError(400, str(e)).response()
        except Exception as e:     # a bug
            log.exception("llmsh: internal error")
            return APIError(500, f"internal error: {type(e).__name__}", code="internal_error").response()
    endpoint.__name__ = fn.__name__
    return endpoint


class _Auth:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer KEY`` (compared in
    constant time), when the server has a key."""

    def __init__(self, app, key: str | None):
        self.app = app
        self.key = key.encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.key is not None:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                what = "no API key given" if not given else "the API key is not valid"
                resp = APIError(401, f"{what}: send 'Authorization: Bearer KEY'", code="invalid_api_key")
                resp.headers["WWW-Authenticate"] = "Bearer"
                await resp.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class API:
    """The endpoints over one :class:`ModelWorker`.

    lm: the :class:`llmsh.loader.LoadedModel`; model_id: the name /v1/models reports (any name
    is accepted in requests: one model is served); n_ctx: the context (KV cache) in tokens.
    """

    def __init__(self, lm, *, model_id: str, n_ctx: int, max_queue: int, max_body: int = MAX_BODY_BYTES):
        self.lm = lm
        self.tok = lm.tokenizer
        self.model_id = model_id
        self.n_ctx = n_ctx
        self.max_body = max_body
        self.state = generation.ModelState(lm, n_ctx)
        self.worker = ModelWorker(self.state, max_queue)
        self.created = int(time.time())
        self.disconnect_poll_s = 0.25   # how often a non-streamed request checks for its client

    # --- helpers --------------------------------------------------------------------------------

    def _params(self, req: schemas._Sampling):
        from ..sampling import SamplingParams

        over = {k: getattr(req, k) for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                             "frequency_penalty", "presence_penalty", "seed")}
        try:
            return SamplingParams.from_generation_config(self.lm.generation_config, **over)
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def _budget(self, n_prompt: int, max_tokens: int | None, *, param: str, default: int | None = None,
                scoring: bool = False, fit: bool = False) -> int:
        """max_tokens checked against the context; None: ``default`` (capped), else what is left;
        ``fit``: a max_tokens beyond the context is capped rather than an error."""
        room = self.n_ctx - n_prompt
        if room < (0 if scoring else 1):
            raise APIError(400, f"the prompt is {n_prompt} tokens but the context is {self.n_ctx} tokens"
                           + ("" if scoring else ": it must leave room for at least one generated token"),
                           param="messages" if param == "max_tokens" and default is None else "prompt",
                           code="context_length_exceeded")
        if max_tokens is None:
            return room if default is None else min(default, room)
        if max_tokens > room and fit:
            return room
        if max_tokens > room:
            raise APIError(400, f"max_tokens is {max_tokens} but the context is {self.n_ctx} tokens and "
                           f"the prompt takes {n_prompt}: at most {room} can be generated",
                           param=param, code="context_length_exceeded")
        return max_tokens

    def _token(self, i: int) -> str:
        return self.tok.decode([i])

    def _chat_logprobs(self, entries) -> list[dict]:
        def one(i, lp):
            s = self._token(i)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
        return [{**one(e.id, e.logprob), "top_logprobs": [one(i, lp) for i, lp in (e.top or [])]}
                for e in entries]

    def _completion_logprobs(self, entries, offset: int = 0) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for e in entries:
            s = self._token(e.id)
            tokens.append(s)
            lps.append(e.logprob)
            top = None
            if e.top is not None:      # most likely first; two ids with one text keep the likelier
                top = {}
                for i, lp in e.top:
                    top.setdefault(self._token(i), lp)
            tops.append(top)
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def _details(self, req, results) -> dict:
        if not req.llmsh.details:
            return {}
        d = [r.details(self.n_ctx) for r in results]
        return {"llmsh": d[0] if len(d) == 1 else d}

    @staticmethod
    def _usage(results) -> dict:
        p = sum(r.prompt_tokens for r in results)
        c = sum(r.completion_tokens for r in results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in results)}}

    async def _encode(self, fn):
        try:
            return await anyio.to_thread.run_sync(fn)
        except LlmshError as e:
            raise APIError(400, str(e)) from None

    # --- endpoints ------------------------------------------------------------------------------

    async def health(self, request: Request):
        return JSONResponse({"status": "ok", "model": self.model_id, "busy": self.worker.busy,
                             "waiting": self.worker.waiting, "max_queue": self.worker.max_queue,
                             "n_ctx": self.n_ctx})

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "llmsh",
             "n_ctx": self.n_ctx}]})

    async def chat(self, request: Request):
        req = await read_body(request, schemas.ChatRequest, self.max_body)
        from ..messages import Message, encode_messages

        if self.tok.chat_template is None:
            raise APIError(400, "the model has no chat template (it is a base model?): use /v1/completions, "
                                "or start llmsh serve with --chat-template FILE", param="messages")
        msgs = [Message("system" if m.role == "developer" else m.role, m.text()) for m in req.messages]
        ids = await self._encode(lambda: encode_messages(self.lm, msgs))
        if not ids:
            raise APIError(400, "the messages have no tokens", param="messages")
        want = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self._budget(len(ids), want, param="max_tokens", fit=req.llmsh.fit_context)
        params = self._params(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        k = (req.top_logprobs or 0) if req.logprobs else None
        st, stops = self.state, req.stops()
        job = self.worker.submit(lambda job: generation.generate(
            st, job, ids, params, max_tokens=max_tokens, stops=stops, logprobs=k, stream=req.stream))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": self.model_id, "system_fingerprint": None}
        if not req.stream:
            r = await _result(job, request, self.disconnect_poll_s)
            choice = {"index": 0, "message": {"role": "assistant", "content": r.text},
                      "logprobs": {"content": self._chat_logprobs(r.logprobs)} if k is not None else None,
                      "finish_reason": r.finish_reason}
            return JSONResponse({**head, "object": "chat.completion", "choices": [choice],
                                 "usage": self._usage([r]), **self._details(req, [r])})
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(delta, finish=None, logprobs=None):
            return {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

        def render(kind, value):
            if kind == "piece":
                text, entries = value
                lp = {"content": self._chat_logprobs(entries)} if k is not None else None
                return [chunk({"content": text}, logprobs=lp)], False
            out = [{**chunk({}, value.finish_reason), **self._details(req, [value])}]
            if include_usage:
                out.append({**head, "object": "chat.completion.chunk", "choices": [], "usage": self._usage([value])})
            return out, True
        return _sse(job, [chunk({"role": "assistant", "content": ""})], render)

    async def completions(self, request: Request):
        req = await read_body(request, schemas.CompletionRequest, self.max_body)
        p = req.prompt
        many = isinstance(p, list) and p and isinstance(p[0], (str, list))
        prompts = list(p) if many else [p]
        if req.stream and len(prompts) > 1:
            raise APIError(400, "stream takes one prompt, not a list of prompts", param="prompt")
        vocab = self.tok.vocab_size

        def encode_all():
            out = []
            for i, one in enumerate(prompts):
                if isinstance(one, str):
                    out.append(self.tok.encode(one))
                else:
                    bad = [t for t in one if t >= vocab]
                    if bad:
                        raise APIError(400, f"token id {bad[0]} is out of range (vocabulary size {vocab})",
                                       param="prompt")
                    out.append(list(one))
            return out

        all_ids = await self._encode(encode_all)
        for ids in all_ids:
            if not ids:
                raise APIError(400, "the prompt has no tokens", param="prompt")
        scoring = req.echo and req.max_tokens == 0
        budgets = [self._budget(len(ids), req.max_tokens, param="max_tokens", default=16, scoring=scoring,
                                fit=req.llmsh.fit_context)
                   for ids in all_ids]
        params = self._params(req)
        k = req.logprobs
        echo_k = k if (req.echo and k is not None) else None
        if echo_k is not None and req.stream:
            # The echoed prompt's chunk goes out before its log-probabilities exist: refused rather
            # than streamed with "logprobs": null (what lm-evaluation-harness reads is the reply of
            # a request without stream).
            raise APIError(400, "echo with logprobs gives the prompt's log-probabilities only without "
                                "streaming: set stream to false", param="stream")
        st, stops = self.state, req.stops()

        def run(job):
            return [generation.generate(st, job, ids, params, max_tokens=n, stops=stops, logprobs=k,
                                        echo_logprobs=echo_k, stream=req.stream, eos_logprob=True)
                    for ids, n in zip(all_ids, budgets)]

        job = self.worker.submit(run)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_id,
                "system_fingerprint": None}
        texts = [self.tok.decode(ids) if req.echo else "" for ids in all_ids]
        if not req.stream:
            results = await _result(job, request, self.disconnect_poll_s)
            choices = []
            for i, (r, prefix) in enumerate(zip(results, texts)):
                lp = None
                if k is not None:
                    lp = self._completion_logprobs((r.prompt_logprobs or []) + (r.logprobs or []))
                choices.append({"index": i, "text": prefix + r.text, "logprobs": lp,
                                "finish_reason": r.finish_reason})
            return JSONResponse({**head, "choices": choices, "usage": self._usage(results),
                                 **self._details(req, results)})
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(text, finish=None, logprobs=None):
            return {**head, "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

        offset = [len(texts[0])]

        def render(kind, value):
            if kind == "piece":
                text, entries = value
                lp = self._completion_logprobs(entries, offset[0]) if k is not None else None
                offset[0] += len(text)
                return [chunk(text, logprobs=lp)], False
            out = [{**chunk("", value[0].finish_reason), **self._details(req, value)}]
            if include_usage:
                out.append({**head, "choices": [], "usage": self._usage(value)})
            return out, True
        start = [chunk(texts[0])] if req.echo else []
        return _sse(job, start, render)

    async def tokenize(self, request: Request):
        req = await read_body(request, schemas.TokenizeRequest, self.max_body)
        from ..stream_decoder import token_pieces

        def run():
            ids = self.tok.encode(req.text, add_bos=req.add_bos, parse_special=req.parse_special)
            return {"ids": ids, "pieces": token_pieces(self.tok, ids), "count": len(ids)}
        return JSONResponse(await self._encode(run))

    async def detokenize(self, request: Request):
        req = await read_body(request, schemas.DetokenizeRequest, self.max_body)
        vocab = self.tok.vocab_size
        bad = [t for t in req.ids if t >= vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range (vocabulary size {vocab})", param="ids")
        text = await self._encode(lambda: self.tok.decode(req.ids))
        return JSONResponse({"text": text, "ids": req.ids, "count": len(req.ids)})

    async def perplexity(self, request: Request):
        req = await read_body(request, schemas.PerplexityRequest, self.max_body)
        if req.n_ctx is None:
            req.n_ctx = min(512, self.lm.n_ctx_max)    # as llmsh ppl's default
        if req.stride is not None and req.all_tokens:
            raise APIError(400, "stride and all_tokens are different protocols: use one", param="stride")
        if req.stride is not None and req.stride > req.n_ctx:
            raise APIError(400, f"stride {req.stride} is larger than n_ctx ({req.n_ctx})", param="stride")
        if req.top_logprobs and not req.per_token:
            raise APIError(400, "top_logprobs adds to the per_token rows: give per_token: true",
                           param="top_logprobs")
        if req.n_ctx > self.lm.n_ctx_max:
            raise APIError(400, f"n_ctx {req.n_ctx} is larger than the model's context ({self.lm.n_ctx_max} tokens)",
                           param="n_ctx", code="context_length_exceeded")
        st = self.state
        job = self.worker.submit(lambda job: generation.perplexity(
            st, job, req.text, n_ctx=req.n_ctx, stride=req.stride, all_tokens=req.all_tokens,
            per_token=req.per_token, top_logprobs=req.top_logprobs))
        return JSONResponse(await _result(job, request, self.disconnect_poll_s))


async def _result(job, request: Request, poll_s: float = 0.25):
    """The job's value; if the client disconnects first, the job is cancelled (at its next
    token) and the request ends without a reply."""
    task = asyncio.ensure_future(job.result())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                job.cancel()
                raise APIError(499, "the client went away", code="client_closed")
    finally:
        if not task.done():
            job.cancel()
            task.cancel()


def _sse(job, start: list[dict], render) -> StreamingResponse:
    """Server-sent events in OpenAI's format: ``data: {chunk}`` per chunk, ``data: [DONE]`` last.

    start: the chunks sent before the job's first event; render(kind, value) -> (chunks, last)
    turns each job event into chunks. A job error after the stream started is one
    ``data: {"error": ...}`` event. When the client goes away Starlette cancels this stream, and
    the ``finally`` cancels the job: generation stops at the next token.
    """
    def line(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def body():
        try:
            for c in start:
                yield line(c)
            while True:
                kind, value = await job.events.get()
                if kind == "error":
                    yield line(value.body())
                    break
                chunks, last = render(kind, value)
                for c in chunks:
                    yield line(c)
                if last:
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _not_found(request: Request, exc: HTTPException):
    if exc.status_code == 405:
        return APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed").response()
    if exc.status_code == 404:
        return APIError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found").response()
    return APIError(exc.status_code, str(exc.detail)).response()


def create_app(lm, *, model_id: str | None = None, n_ctx: int | None = None, api_key: str | None = None,
               max_queue: int = 16, max_body: int = MAX_BODY_BYTES):
    """The ASGI app serving ``lm`` (a :class:`llmsh.loader.LoadedModel`).

    model_id: the name in /v1/models and replies (default: the model folder's name); n_ctx: the
    context in tokens (default: the model's, capped at 8192); api_key: required as a Bearer token
    on every request when given; max_queue: requests waiting for the model before 503; max_body:
    the largest request body in bytes. The model thread starts and stops with the app's lifespan
    (or on first use, for test clients that do not run it). ``app.state.api`` is the :class:`API`.
    """
    from ..session import DEFAULT_N_CTX_CAP

    if n_ctx is None:
        n_ctx = min(lm.n_ctx_max, DEFAULT_N_CTX_CAP)
    api = API(lm, model_id=model_id or lm.name, n_ctx=n_ctx, max_queue=max_queue, max_body=max_body)

    @asynccontextmanager
    async def lifespan(app):
        api.worker.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(api.worker.stop)

    routes = [
        Route("/health", _handle(api.health), methods=["GET"]),
        Route("/v1/models", _handle(api.models), methods=["GET"]),
        Route("/v1/chat/completions", _handle(api.chat), methods=["POST"]),
        Route("/v1/completions", _handle(api.completions), methods=["POST"]),
        Route("/tokenize", _handle(api.tokenize), methods=["POST"]),
        Route("/detokenize", _handle(api.detokenize), methods=["POST"]),
        Route("/perplexity", _handle(api.perplexity), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _not_found})
    app.state.api = api
    api.worker.start()    # idempotent; without a lifespan (plain ASGI test clients) it still runs
    app.add_middleware(_Auth, key=api_key)
    return app
