"""Client mode: ``generate``, ``tokenize`` and ``perplexity`` with ``--server URL`` (or
``LLMSH_SERVER``) ask a running ``llmsh serve``.

No torch and no model load in this process, so the answer starts in a fraction of a second.
HTTP goes through the standard library's ``http.client``: it imports in a few milliseconds,
where httpx takes longer than the whole start-up budget on a loaded 2-core machine. Output,
exit codes and ``--json`` are those of the command without a server; the server's errors
become the usual one-line ``llmsh: error: ...``; a server that is not there is one line naming
the URL. ``LLMSH_API_KEY``, when set, is sent as the Bearer token.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import click

from ..errors import InputError


def server_option(f):
    """``--server URL`` [env: LLMSH_SERVER]."""
    return click.option("--server", envvar="LLMSH_SERVER", metavar="URL",
                        help="Ask the llmsh serve running at URL (e.g. http://127.0.0.1:8088) instead of "
                             "loading the model here: same output, no start-up cost. The server's "
                             "model and context apply [env: LLMSH_SERVER; key: LLMSH_API_KEY].")(f)


class Server:
    """A running ``llmsh serve`` at ``url`` (http or https, with an optional base path)."""

    def __init__(self, url: str, api_key: str | None = None):
        from urllib.parse import urlsplit

        u = urlsplit(url if "://" in url else "http://" + url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise InputError(f"--server {url!r} is not an http:// or https:// URL")
        self.url = url
        self.scheme, self.host, self.port = u.scheme, u.hostname, u.port
        self.base = u.path.rstrip("/")
        if self.base.endswith("/v1"):      # the OpenAI base URL works too
            self.base = self.base[:-3]
        self.api_key = api_key if api_key is not None else os.environ.get("LLMSH_API_KEY") or None

    def post(self, path: str, body: dict):
        """POST ``body`` as JSON; the open response (status 200). Raises InputError: the server
        cannot be reached (naming the URL), or it answered an error (its message)."""
        return self._request("POST", path, json.dumps(body).encode(), timeout=600)

    def get(self, path: str) -> bytes:
        """GET ``path``; the body of the response (status 200). Raises InputError as :meth:`post`."""
        return self._request("GET", path, None, timeout=30).read()

    def _request(self, method: str, path: str, body: bytes | None, *, timeout: float):
        import http.client

        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=timeout)
        headers = {} if body is None else {"Content-Type": "application/json",
                                           "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            conn.request(method, self.base + path, body=body, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise InputError(f"cannot reach the llmsh server at {self.url}: {reason}") from None
        if resp.status != 200:
            raw = resp.read()
            try:
                msg = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = f"HTTP {resp.status} {resp.reason}"
            raise InputError(f"the server at {self.url}: {msg}")
        return resp

    def events(self, resp):
        """The JSON chunks of a server-sent-events reply, up to ``data: [DONE]``."""
        for raw in resp:
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                return
            obj = json.loads(data)
            if "error" in obj:
                raise InputError(f"the server at {self.url}: {obj['error'].get('message')}")
            yield obj


def _stats(d: dict) -> SimpleNamespace:
    """The server's ``llmsh.stats`` as the attributes of :class:`llmsh.generate.GenerationStats`
    that the --stats line and --json timings read (without importing the engine)."""
    st = SimpleNamespace(**{"compile_seconds": 0.0, **d})    # an older server sends no compile time
    prefill = st.prompt_tokens - st.reused_tokens
    st.prefill_tokens_per_s = prefill / st.prefill_seconds if st.prefill_seconds > 0 else 0.0
    st.decode_tokens_per_s = st.decode_steps / st.decode_seconds if st.decode_seconds > 0 else 0.0
    return st


def generate_remote(url: str, text: str, *, chat_mode: bool | None, system: str | None, max_tokens: int,
                    sampling: dict, stop, stats: bool, as_json: bool) -> None:
    """``llmsh generate`` through the server: the chat endpoint (the server's chat template;
    --raw: the completions endpoint), streamed to stdout, or one --json object."""
    from . import output
    from .common import timings

    server = Server(url)
    # --json streams too, so that a Ctrl-C still prints what was generated (as without --server)
    body = {"max_tokens": max_tokens, "stream": True, "llmsh": {"fit_context": True, "details": True},
            **{k: v for k, v in sampling.items() if v is not None}}
    if stop:
        body["stop"] = list(stop)
    if chat_mode is False:
        if system is not None:
            raise click.UsageError("--system needs chat mode (drop --raw)")
        path, body["prompt"] = "/v1/completions", text
    else:
        path = "/v1/chat/completions"
        body["messages"] = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": text}]
    resp = server.post(path, body)
    out = None if as_json else output.StreamWriter()
    d, finish, pieces = None, None, []
    try:
        for chunk in server.events(resp):
            if "llmsh" in chunk:
                d = chunk["llmsh"]
            for c in chunk.get("choices") or []:
                piece = c["delta"].get("content") if "delta" in c else c.get("text")
                finish = c.get("finish_reason") or finish
                if piece:
                    pieces.append(piece)
                    if out is not None:
                        out.write(piece)
    except KeyboardInterrupt:
        resp.close()            # the server stops at its next token
        if as_json:             # what was generated so far; its ids and timings are the server's
            click.echo(json.dumps({"text": "".join(pieces), "tokens": [], "finish_reason": "interrupted",
                                   "prompt_tokens": None, "completion_tokens": None, "n_ctx": None,
                                   "timings": None}, ensure_ascii=False))
        raise click.exceptions.Exit(130) from None
    finally:
        if out is not None:
            out.finish()
    if as_json:
        st = _stats(d["stats"])
        click.echo(json.dumps({"text": "".join(pieces), "tokens": d["token_ids"], "finish_reason": finish,
                               "prompt_tokens": st.prompt_tokens, "completion_tokens": st.generated_tokens,
                               "n_ctx": d["n_ctx"], "timings": timings(st)}, ensure_ascii=False, allow_nan=False))
    if stats and d is not None:
        output.notice(output.stats_line(_stats(d["stats"]), context_used=d["context_used"], n_ctx=d["n_ctx"]))


def _given(*params: str) -> str | None:
    """The first of ``params`` (click parameter names) given on this command's line, as its
    option name (``--n-ctx``), or None: the options that belong to the server in client mode."""
    ctx = click.get_current_context()
    for p in params:
        src = ctx.get_parameter_source(p)
        if src is not None and src.name == "COMMANDLINE":
            return "--" + {"compile_": "compile"}.get(p, p).replace("_", "-")
    return None


def _refuse_the_servers(*params: str) -> None:
    name = _given(*params)
    if name:
        raise click.UsageError(f"{name} is the server's (given to llmsh serve): drop it with --server")


def remote_generate(server, prompt, chat_mode, system, max_tokens, n_ctx, stop, stats, as_json, errors,
                    sampling) -> None:
    """The ``generate`` command with ``--server``: checks what only applies to a local model,
    reads the prompt as without a server, and asks the server."""
    from .common import arg_text, read_prompt

    _refuse_the_servers("model", "n_ctx", "quantize", "compile_", "tp")
    text = read_prompt(prompt, errors)
    system = None if system is None else arg_text(system, "the --system value", errors)
    generate_remote(server, text, chat_mode=chat_mode, system=system, max_tokens=max_tokens, sampling=sampling,
                    stop=stop, stats=stats, as_json=as_json)


class _RemoteTokenizer:
    """The server's tokenizer, as ``tokenize`` uses it (``/tokenize``, ``/detokenize``)."""

    def __init__(self, server: Server):
        self.server = server

    def encode(self, text: str, *, add_bos: bool | None, parse_special: bool) -> tuple[list[int], list[str]]:
        """(ids, pieces) of ``text``."""
        r = json.loads(self.server.post("/tokenize", {"text": text, "add_bos": add_bos,
                                                      "parse_special": parse_special}).read())
        return r["ids"], r["pieces"]

    def decode(self, ids: list[int]) -> str:
        return json.loads(self.server.post("/detokenize", {"ids": ids}).read())["text"]


def remote_tokenizer(url: str) -> _RemoteTokenizer:
    """``tokenize --server URL``: -m and the model options belong to the server then."""
    _refuse_the_servers("model")
    return _RemoteTokenizer(Server(url))


def remote_perplexity(url: str, sources: list[str], *, n_ctx: int | None, stride, all_tokens: bool, as_json: bool,
                      per_token, top_logprobs, errors: str, result_line, strip) -> None:
    """``perplexity --server URL``: one FILE (or stdin) scored by the server's ``/perplexity``;
    the same result line, --json object and --per-token rows as without a server."""
    from . import output

    ctx = click.get_current_context()
    name = _given("model", "quantize", "tp", "each_line", "kl_base", "kl_divergence")
    if name:
        raise click.UsageError(f"{name} does not work with --server")
    if len(sources) > 1:
        raise click.UsageError("with --server, give one FILE (or stdin)")
    server = Server(url)
    source = sources[0] if sources[0] != "-" else "<stdin>"
    text = strip(output.read_file(sources[0], errors=errors))
    per_file = output.output_file(per_token, inputs=sources) if per_token is not None else None
    if per_file is not None:
        ctx.call_on_close(per_file.discard)
    body = {"text": text, "n_ctx": n_ctx, "stride": stride, "all_tokens": all_tokens,
            "per_token": per_token is not None, "top_logprobs": top_logprobs}
    r = json.loads(server.post("/perplexity", body).read())
    rows = r.pop("tokens", [])
    r["source"] = source
    if as_json:
        click.echo(json.dumps(r))
    else:
        nan = float("nan")
        # NaN where JSON has null, as the result line expects; stride stays None when absent
        fields = {**{k: nan if v is None else v for k, v in r.items()}, "stride": r.get("stride")}
        click.echo(result_line(source, SimpleNamespace(**fields)))
    if per_file is not None:
        for row in rows:
            per_file.write(json.dumps({"source": source, **row}, ensure_ascii=False) + "\n")
        per_file.commit()


# Sampling fields ``/set`` may change in client mode, with the ranges the server checks again.
_RANGES = {"temperature": (0, None), "top_k": (0, None), "top_p": (0, 1), "min_p": (0, 1),
           "repetition_penalty": (0, None), "seed": (0, 2**63 - 1)}


def _chat_session_class():
    from ..session import ChatSession, Message

    class RemoteChatSession(ChatSession):
        """A :class:`llmsh.session.ChatSession` whose replies come from the server's chat endpoint:
        the conversation (editing, /undo, /regen, /save, /load) is kept here, the server renders
        the template and keeps the KV cache (its prefix reuse serves the resent conversation).
        A conversation that outgrows the context is the server's 400, not a dropped exchange."""

        def __init__(self, server: Server, *, system=None, params: dict, max_tokens=None):
            health = json.loads(server.get("/health"))
            self.server = server
            from pathlib import PurePosixPath

            # What /show and the banner read of a model: here, what the server says of its own.
            self.model = SimpleNamespace(path=PurePosixPath(health["model"]), device="server", dtype="-",
                                         config=SimpleNamespace(model_type=f"served at {server.url}"),
                                         tokenizer=SimpleNamespace(chat_template="(the server's)"))
            self.system = system or None
            self.params = SimpleNamespace(**{k: params.get(k) for k in _RANGES})
            self.max_tokens = max_tokens
            self.n_ctx = int(health["n_ctx"])
            self.notices = []
            self._notice = self.notices.append
            self.messages = []
            self.cache = None
            self.cache_ids = []
            self.last_stats = None
            self.template = "(the server's chat template)"
            self._generator = None
            self._saved = (None, [])
            self._context_used = 0

        def set_params(self, **changes) -> None:
            if "max_tokens" in changes:
                super().set_params(max_tokens=changes.pop("max_tokens"))
            for k, v in changes.items():
                lo, hi = _RANGES[k]
                if v is not None and ((lo is not None and v < lo) or (hi is not None and v > hi)):
                    raise InputError(f"{k} must be in [{lo}, {hi if hi is not None else 'inf'}], got {v!r}")
                setattr(self.params, k, v)

        def clear(self) -> None:
            self.messages.clear()

        def _fit(self):
            return None      # the server renders and measures the conversation

        @property
        def context_used(self) -> int:
            return self._context_used

        def _stream(self, ids, on_nothing, nothing: str = "message dropped"):
            body = {"messages": [{"role": m.role, "content": m.content} for m in self._all()],
                    "stream": True, "llmsh": {"fit_context": True, "details": True},
                    **{k: v for k, v in vars(self.params).items() if v is not None}}
            if self.max_tokens is not None:
                body["max_tokens"] = self.max_tokens
            pieces: list[str] = []
            done = False
            resp = None
            try:
                resp = self.server.post("/v1/chat/completions", body)
                for chunk in self.server.events(resp):
                    if "llmsh" in chunk:
                        d = chunk["llmsh"]
                        self.last_stats = _stats(d["stats"])
                        self._context_used = d["context_used"]
                    for c in chunk.get("choices") or []:
                        piece = c["delta"].get("content")
                        if piece:
                            pieces.append(piece)
                            yield piece
                done = True
            finally:
                if resp is not None:
                    resp.close()      # a reply cut short: the server stops at its next token
                if pieces:
                    self.messages.append(Message("assistant", "".join(pieces), interrupted=not done))
                    self.last_interrupt = None if done else "partial reply kept"
                else:
                    on_nothing()
                    self.last_interrupt = nothing
                if not done and self.last_stats is not None:
                    self.last_stats.finish_reason = "interrupted"

    return RemoteChatSession


def remote_chat(url: str, *, system, max_tokens, sampling: dict, stats: bool, history: bool, piped,
                markdown: bool | None = None) -> int:
    """``llmsh chat --server URL``: the chat shell (or the one piped message) over the server."""
    import io

    from .repl import run_chat

    _refuse_the_servers("model", "n_ctx", "quantize", "compile_")
    session = _chat_session_class()(Server(url), system=system, params=sampling, max_tokens=max_tokens)
    return run_chat(None, session=session, stats=stats, history=history, markdown=markdown,
                    stdin=io.StringIO(piped) if piped is not None else None)
