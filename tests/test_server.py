"""``llmsh serve``: the ASGI app through Starlette's TestClient on the tiny chat model (references:
``llmsh generate --json`` and ``llmsh ppl --per-token`` on the same model and text, and a fresh
cache for prefix reuse), raw ASGI for a client that goes away mid-stream, and one real uvicorn
process on the default model driven by the official ``openai`` client.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli_fixtures import chat_model  # noqa: F401  (fixture)
from llmsh.cli import cli

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

HELLO = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def lm(chat_model):  # noqa: F811
    from llmsh.loader import load_model

    return load_model(str(chat_model), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def app(lm):
    from llmsh.server import create_app

    return create_app(lm, max_queue=2)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture
def api(app):
    return app.state.api


def fresh_cache(api):
    api.state.cache.reset()
    api.state.cache_ids = []


def run_cli(args):
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    return r.output


def chat(client, **body):
    r = client.post("/v1/chat/completions", json={"messages": HELLO, **body})
    assert r.status_code == 200, r.text
    return r.json()


def sse(client, path, body) -> list:
    """The ``data:`` payloads of a streamed reply, JSON-decoded ([DONE] kept as the string)."""
    out = []
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: ")
                data = line[len("data: "):]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


# --- endpoints ----------------------------------------------------------------------------------


def test_health_and_models(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["n_ctx"] == 256 and h["max_queue"] == 2
    m = client.get("/v1/models").json()
    assert m["object"] == "list" and [d["id"] for d in m["data"]] == ["qwen2"]
    assert m["data"][0]["object"] == "model"


def test_greedy_chat_equals_llmsh_generate(client, chat_model):  # noqa: F811
    want = json.loads(run_cli(["generate", "-m", str(chat_model), "--json", "--temperature", "0", "-n", "12",
                               HELLO[0]["content"]]))
    got = chat(client, temperature=0, max_tokens=12)
    choice = got["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": want["text"]}
    assert choice["finish_reason"] == want["finish_reason"]
    assert got["object"] == "chat.completion" and got["id"].startswith("chatcmpl-")
    u = got["usage"]
    assert (u["prompt_tokens"], u["completion_tokens"]) == (want["prompt_tokens"], want["completion_tokens"])
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_stream_chunks_join_into_the_reply(client):
    whole = chat(client, temperature=0, max_tokens=10)["choices"][0]
    events = sse(client, "/v1/chat/completions", {"messages": HELLO, "temperature": 0, "max_tokens": 10,
                                                  "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["message"]["content"]
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finals[-1] == whole["finish_reason"] and set(finals[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10


def test_chat_logprobs(client):
    got = chat(client, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    content = got["choices"][0]["logprobs"]["content"]
    assert len(content) == got["usage"]["completion_tokens"] == 5
    for e in content:
        assert len(e["top_logprobs"]) == 3
        # greedy: the chosen token is the most likely one
        assert e["logprob"] == pytest.approx(e["top_logprobs"][0]["logprob"])
        assert e["logprob"] <= 0 and e["bytes"] == list(e["token"].encode())
    assert chat(client, max_tokens=2)["choices"][0]["logprobs"] is None


def test_prefix_of_the_last_request_is_reused(client, api):
    fresh_cache(api)
    first = chat(client, temperature=0, max_tokens=6)
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    reply = first["choices"][0]["message"]["content"]
    turn2 = HELLO + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Tell me a story."}]
    r = client.post("/v1/chat/completions", json={"messages": turn2, "temperature": 0, "max_tokens": 6}).json()
    cached = r["usage"]["prompt_tokens_details"]["cached_tokens"]
    # Everything up to the end of the first prompt is reused (and, here, the reply's tokens too).
    assert first["usage"]["prompt_tokens"] <= cached < r["usage"]["prompt_tokens"]
    fresh_cache(api)
    again = client.post("/v1/chat/completions", json={"messages": turn2, "temperature": 0, "max_tokens": 6}).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["choices"][0]["message"] == r["choices"][0]["message"]


def test_seeded_sampling_is_reproducible(client):
    body = dict(temperature=1.0, top_k=0, seed=7, max_tokens=8)
    assert chat(client, **body)["choices"][0] == chat(client, **body)["choices"][0]


def test_frequency_penalty_changes_greedy_output(client):
    plain = chat(client, temperature=0, max_tokens=30)["choices"][0]["message"]["content"]
    pen = chat(client, temperature=0, max_tokens=30, frequency_penalty=2.0, presence_penalty=2.0)
    assert pen["choices"][0]["message"]["content"] != plain


def test_stop_string_is_cut(client):
    whole = chat(client, temperature=0, max_tokens=12)["choices"][0]["message"]["content"]
    stop = whole[3:5]
    assert stop.strip()
    got = chat(client, temperature=0, max_tokens=12, stop=[stop])["choices"][0]
    assert got["message"]["content"] == whole[: whole.index(stop)] and got["finish_reason"] == "stop"


# --- completions and scoring --------------------------------------------------------------------


TEXT = "The quick brown fox jumps over the lazy dog. Hello, how are you today?"


def test_streamed_echo_with_logprobs_is_refused_not_null(client):
    """The echoed prompt's chunk would go out before its log-probabilities exist."""
    r = client.post("/v1/completions", json={"prompt": "The capital", "max_tokens": 2, "stream": True,
                                             "echo": True, "logprobs": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
    r = client.post("/v1/completions", json={"prompt": "The capital", "max_tokens": 2, "stream": True, "echo": True})
    assert r.status_code == 200          # echo alone streams as before


def test_echo_logprobs_equal_llmsh_ppl_per_token(client, chat_model, tmp_path):  # noqa: F811
    src = tmp_path / "t.txt"
    src.write_text(TEXT, encoding="utf-8")
    rows = tmp_path / "rows.jsonl"
    # One window over the whole text: every token after the first is scored once.
    run_cli(["ppl", "-m", str(chat_model), "--n-ctx", "200", "--stride", "200", "--per-token", str(rows),
             "--top-logprobs", "1", str(src)])
    want = [json.loads(line) for line in rows.read_text().splitlines()]
    r = client.post("/v1/completions", json={"prompt": TEXT, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == TEXT
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert len(lp["token_logprobs"]) == len(want) + 1
    assert lp["token_logprobs"][1:] == pytest.approx([w["logprob"] for w in want], abs=1e-9)  # the same passes
    assert [w["text"] for w in want] == lp["tokens"][1:]
    for top, w in zip(lp["top_logprobs"][1:], want):
        (tok, val), = top.items()
        assert tok == w["top_logprobs"][0]["text"] and val == pytest.approx(w["top_logprobs"][0]["logprob"], abs=1e-5)
    assert "".join(lp["tokens"]) == TEXT
    assert lp["text_offset"][:2] == [0, len(lp["tokens"][0])]
    assert r.json()["usage"] == {"prompt_tokens": len(want) + 1, "completion_tokens": 0,
                                 "total_tokens": len(want) + 1, "prompt_tokens_details": {"cached_tokens": 0}}


def test_completions_token_id_prompts_as_lm_eval_sends_them(client, lm):
    """lm-evaluation-harness local-completions: a batch of token-id prompts, echo, logprobs 1,
    max_tokens 1; it sums token_logprobs[ctxlen:-1]."""
    prompts = [lm.tokenizer.encode("Hello, how are you"), lm.tokenizer.encode("The quick brown fox")]
    r = client.post("/v1/completions", json={"model": "x", "prompt": prompts, "echo": True, "logprobs": 1,
                                             "max_tokens": 1, "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for ids, c in zip(prompts, choices):
        lp = c["logprobs"]["token_logprobs"]
        assert len(lp) == len(ids) + 1 and lp[0] is None
        alone = client.post("/v1/completions", json={"prompt": ids, "echo": True, "logprobs": 1,
                                                     "max_tokens": 0}).json()["choices"][0]["logprobs"]
        assert lp[:-1] == pytest.approx(alone["token_logprobs"], abs=1e-5)


def test_completions_generate_from_raw_text(client, lm):
    r = client.post("/v1/completions", json={"prompt": "The quick", "max_tokens": 5, "temperature": 0})
    c = r.json()["choices"][0]
    assert r.json()["object"] == "text_completion" and c["logprobs"] is None
    assert r.json()["usage"]["completion_tokens"] == 5 and c["finish_reason"] == "length"
    events = sse(client, "/v1/completions", {"prompt": "The quick", "max_tokens": 5, "temperature": 0,
                                             "stream": True})
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == c["text"]


def test_tokenize_detokenize(client, lm):
    t = client.post("/tokenize", json={"text": "Hello <|im_end|> world"}).json()
    assert t["ids"] == lm.tokenizer.encode("Hello <|im_end|> world") and t["count"] == len(t["ids"])
    assert "".join(t["pieces"]) == "Hello <|im_end|> world"
    assert 2 in client.post("/tokenize", json={"text": "<|im_end|>", "parse_special": True}).json()["ids"]
    d = client.post("/detokenize", json={"ids": t["ids"]}).json()
    assert d["text"] == "Hello <|im_end|> world"
    assert client.post("/detokenize", json={"ids": [10**6]}).status_code == 400


def test_perplexity_equals_llmsh_ppl_json(client, chat_model, tmp_path):  # noqa: F811
    src = tmp_path / "t.txt"
    src.write_text(TEXT * 3, encoding="utf-8")
    want = json.loads(run_cli(["ppl", "-m", str(chat_model), "--n-ctx", "16", "--json", str(src)]))
    got = client.post("/perplexity", json={"text": TEXT * 3, "n_ctx": 16}).json()
    assert got.pop("source") == "request" and want.pop("source") == str(src)
    assert got == pytest.approx(want)
    per = client.post("/perplexity", json={"text": TEXT, "n_ctx": 200, "stride": 200, "per_token": True,
                                           "top_logprobs": 2}).json()
    assert len(per["tokens"]) == per["n_tokens"] and len(per["tokens"][0]["top_logprobs"]) == 2
    bad = client.post("/perplexity", json={"text": "Hi", "n_ctx": 16})
    assert bad.status_code == 400 and "needs at least" in bad.json()["error"]["message"]


# --- errors -------------------------------------------------------------------------------------


def _chat_body(**kw):
    return json.dumps({"messages": HELLO, **kw}).encode()


ERRORS = [
    # (path, raw body, status, param)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b'{"messages": "\xff"}', 400, None),          # invalid UTF-8
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", b'{"messages": [], "max_tokens": 3}', 422, "messages"),
    ("/v1/chat/completions", b"{}", 422, "messages"),
    ("/v1/chat/completions", _chat_body(frobnicate=1), 422, "frobnicate"),
    ("/v1/chat/completions", _chat_body(max_tokens="3"), 422, "max_tokens"),
    ("/v1/chat/completions", _chat_body(temperature=-1), 422, "temperature"),
    ("/v1/chat/completions", _chat_body(top_logprobs=99, logprobs=True), 422, "top_logprobs"),
    ("/v1/chat/completions", _chat_body(stop=[""]), 422, "stop.0"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', 422, "messages.0.role"),
    ("/v1/chat/completions", _chat_body(max_tokens=10**6), 400, "max_tokens"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "%s"}]}' % (b"hello " * 300), 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, None),
    ("/v1/completions", b'{"prompt": [5, 99999]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": ""}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "suffix": "y"}', 422, "suffix"),
    ("/v1/completions", b'{"prompt": "x", "logprobs": true}', 422, "logprobs"),
    ("/tokenize", b'{"text": 5}', 422, "text"),
    ("/tokenize", b'{"text": "a\\ud800b"}', 400, None),                 # a lone surrogate
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\uDFFF"}]}', 400, None),
    ("/perplexity", b'{"text": "x", "n_ctx": 100000}', 400, "n_ctx"),
]


@pytest.mark.parametrize("path,body,status,param", ERRORS)
def test_bad_requests_get_openai_shaped_errors(client, path, body, status, param):
    r = client.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert "Traceback" not in err["message"] and "\n" not in err["message"]


def test_unknown_path_method_and_body_size(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.get("/v1/chat/completions").status_code == 405
    r = client.post("/v1/chat/completions", content=b" " * (8 << 20 | 1))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_full_queue_answers_503_with_retry_after(client, api):
    release = threading.Event()

    async def occupy():
        return api.worker.submit(lambda job: release.wait(30))

    async def fill():
        return [api.worker.submit(lambda job: None) for _ in range(api.worker.max_queue)]

    running = client.portal.call(occupy)
    try:
        deadline = time.time() + 10
        while not api.worker.busy and time.time() < deadline:
            time.sleep(0.01)
        waiting = client.portal.call(fill)
        r = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_busy"
    finally:
        release.set()
    for job in [running, *waiting]:
        client.portal.call(job.result)
    assert chat(client, max_tokens=2)["usage"]["completion_tokens"] <= 2


def test_a_client_that_goes_away_stops_its_generation(app, api):
    """Raw ASGI: the client disconnects after the first streamed token; the model thread must stop
    at the next token, not run on to max_tokens."""
    body = json.dumps({"prompt": "The quick brown fox", "max_tokens": 200, "temperature": 0,
                       "stream": True}).encode()
    fresh_cache(api)
    n_prompt = len(api.lm.tokenizer.encode("The quick brown fox"))

    async def drive(disconnect_after: int | None):
        gone = asyncio.Event()
        sent_body = False
        t_body = 0.0
        chunks = []

        async def receive():
            nonlocal sent_body
            nonlocal t_body
            if not sent_body:
                sent_body = True
                t_body = time.monotonic()
                return {"type": "http.request", "body": body, "more_body": False}
            if disconnect_after is None:
                await asyncio.Event().wait()
            if disconnect_after:
                await gone.wait()
            else:   # gone 20 ms after the body; then, as uvicorn, say so without waiting
                left = t_body + 0.02 - time.monotonic()
                if left > 0:
                    await asyncio.sleep(left)
            return {"type": "http.disconnect"}

        async def send(msg):
            if msg["type"] == "http.response.body" and msg.get("body"):
                chunks.append(msg["body"])
                if disconnect_after is not None and len(chunks) >= disconnect_after:
                    gone.set()

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        task = asyncio.ensure_future(app(scope, receive, send))
        await asyncio.wait_for(task if disconnect_after is not None else _until_done(chunks, task), 60)
        return chunks

    async def _until_done(chunks, task):
        while not any(b"[DONE]" in c for c in chunks):
            await asyncio.sleep(0.01)
        task.cancel()

    full = asyncio.run(drive(None))
    assert len(api.state.cache_ids) - n_prompt >= 199, "precondition: the greedy reply runs to max_tokens"
    # The same request not streamed: the client that goes away cancels it too.
    fresh_cache(api)
    done = api.worker.jobs_done
    body = body.replace(b'"stream": true', b'"stream": false')
    api.disconnect_poll_s = 0.005     # 200 tokens of the tiny model take a few tenths of a second
    try:
        asyncio.run(drive(0))
    finally:
        api.disconnect_poll_s = 0.25
    deadline = time.time() + 30
    while (api.worker.busy or api.worker.jobs_done == done) and time.time() < deadline:
        time.sleep(0.01)
    assert len(api.state.cache_ids) - n_prompt < 150
    body = body.replace(b'"stream": false', b'"stream": true')
    fresh_cache(api)
    done = api.worker.jobs_done
    asyncio.run(drive(2))         # the first chunk and one token, then the client is gone
    deadline = time.time() + 30
    while (api.worker.busy or api.worker.jobs_done == done) and time.time() < deadline:
        time.sleep(0.01)
    generated = len(api.state.cache_ids) - n_prompt
    assert generated < 20, generated
    assert len(full) > 100


# --- auth and the command line ------------------------------------------------------------------


def test_api_key_is_checked_on_every_request(lm):
    from llmsh.server import create_app

    with TestClient(create_app(lm, api_key="s3cret")) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1})
        assert r.status_code == 401


def test_non_loopback_host_needs_a_key(monkeypatch):
    from llmsh.server import is_loopback

    monkeypatch.delenv("LLMSH_API_KEY", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")
    r = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "-m", "/nonexistent"])
    assert r.exit_code == 2 and "--api-key" in r.output and "Traceback" not in r.output


def test_busy_port_is_one_line_error(chat_model):  # noqa: F811
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        # before the model would load: -m names nothing
        r = CliRunner().invoke(cli, ["serve", "-m", "/nonexistent", "--port", str(s.getsockname()[1])])
    finally:
        s.close()
    assert r.exit_code == 1 and "cannot listen on 127.0.0.1" in r.output


# --- a real server ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.default_model
@pytest.mark.slow
def test_uvicorn_process_with_the_openai_client(tmp_path):
    openai = pytest.importorskip("openai")
    from cli_fixtures import DEFAULT_MODEL_HOME

    if not any(Path(DEFAULT_MODEL_HOME).glob("**/config.json")):
        pytest.skip(f"the default model is not in {DEFAULT_MODEL_HOME}")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    prompt = "What is the capital of France?"
    want = subprocess.run([sys.executable, "-m", "llmsh", "generate", "--temperature", "0", "-n", "16", prompt],
                          env=env, capture_output=True, text=True, timeout=300)
    assert want.returncode == 0, want.stderr
    proc, url = _start_server([])
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["smollm2-135m-instruct"]
        r = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=16,
                                           messages=[{"role": "user", "content": prompt}])
        assert r.choices[0].message.content == want.stdout.rstrip("\n")
        stream = client.chat.completions.create(model="m", temperature=0, max_tokens=16, stream=True,
                                                messages=[{"role": "user", "content": prompt}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want.stdout.rstrip("\n")
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="m", max_tokens=10**6, messages=[{"role": "user", "content": "x"}])
        # Prompt log-probabilities through the openai client = llmsh ppl --per-token on the same text.
        text = "The capital of France is Paris. It is known for the Eiffel Tower and fine food."
        src = tmp_path / "fr.txt"
        src.write_text(text, encoding="utf-8")
        rows = tmp_path / "rows.jsonl"
        ppl = subprocess.run([sys.executable, "-m", "llmsh", "ppl", "--n-ctx", "512", "--stride", "512",
                              "--per-token", str(rows), str(src)], env=env, capture_output=True, text=True,
                             timeout=300)
        assert ppl.returncode == 0, ppl.stderr
        want = [json.loads(line)["logprob"] for line in rows.read_text().splitlines()]
        c = client.completions.create(model="m", prompt=text, echo=True, logprobs=1, max_tokens=0)
        got = c.choices[0].logprobs.token_logprobs
        assert got[0] is None and got[1:] == pytest.approx(want, abs=1e-5)
        assert c.choices[0].text == text
        # SIGTERM while a long reply streams: it ends with an error event and [DONE], the process with 0.
        import httpx

        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"prompt": "Once upon a time", "max_tokens": 1000, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            t0 = time.time()
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["error"]["code"] == "shutting_down"
        _, err = proc.communicate(timeout=60)
        assert time.time() - t0 < 10
    finally:
        if proc.poll() is None:
            _stop(proc)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "serving on http://127.0.0.1:" in err


def _start_server(args, env=None):
    """A ``llmsh serve`` process on a free loopback port; returns (process, base URL) once /health answers."""
    import httpx

    port = _free_port()
    env = dict(os.environ if env is None else env, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "llmsh", "serve", "--port", str(port), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the server did not start: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)


def _stop(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    return err


@pytest.mark.slow
def test_load_four_clients_a_killed_stream_and_memory(chat_model):  # noqa: F811
    """4 clients x 25 requests at once: every reply is the one its prompt gets alone (none lost or
    crossed); a client that disconnects mid-stream does not stall the next request; the server's
    RSS after the run is within 50 MB of before."""
    import httpx
    import psutil

    proc, url = _start_server(["-m", str(chat_model), "--max-queue", "8"])
    try:
        prompts = [f"Tell me a story about robot number {i}." for i in range(10)]

        def ask(c, p):
            r = c.post(url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 8})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        with httpx.Client() as c:
            want = {p: ask(c, p) for p in prompts}
        assert len(set(want.values())) > 1, "precondition: different prompts get different replies"
        rss0 = psutil.Process(proc.pid).memory_info().rss
        errors = []

        def client(k):
            with httpx.Client() as c:
                for j in range(25):
                    p = prompts[(k * 7 + j) % len(prompts)]
                    got = ask(c, p)
                    if got != want[p]:
                        errors.append((p, got, want[p]))

        t0 = time.time()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads) and time.time() - t0 < 120
        assert errors == []
        # A client that reads one chunk of a long stream and goes away.
        with httpx.Client() as c:
            with c.stream("POST", url + "/v1/completions", timeout=60,
                          json={"prompt": "The quick brown fox", "max_tokens": 220, "stream": True}) as r:
                next(r.iter_lines())
            t1 = time.time()
            assert ask(c, prompts[0]) == want[prompts[0]]
            assert time.time() - t1 < 10
        rss1 = psutil.Process(proc.pid).memory_info().rss
        assert rss1 - rss0 < 50 << 20, (rss0, rss1)
    finally:
        if proc.poll() is None:
            _stop(proc)


# --- the command line as a client ----------------------------------------------------------------


@pytest.mark.slow
def test_generate_through_a_server_is_generate_without_torch(chat_model, tmp_path):  # noqa: F811
    proc, url = _start_server(["-m", str(chat_model)])
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("LLMSH_SERVER", None)

    def llmsh(*args, server=None):
        e = dict(env, **({"LLMSH_SERVER": server} if server else {}))
        return subprocess.run([sys.executable, "-m", "llmsh", *args], env=e, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)

    try:
        for args in (["--temperature", "0", "-n", "12", "Hello, how are you today?"],
                     ["--raw", "--temperature", "0", "-n", "9", "--stop", "e", "The quick brown"],
                     ["--system", "Be brief.", "--temperature", "1", "--seed", "3", "-n", "7", "Hi"]):
            here = llmsh("generate", "-m", str(chat_model), "--json", *args)
            there = llmsh("generate", "--json", *args, server=url)
            assert here.returncode == there.returncode == 0, (here.stderr, there.stderr)
            a, b = json.loads(here.stdout), json.loads(there.stdout)
            assert a.pop("timings").keys() == b.pop("timings").keys()
            assert a == b
            streamed = llmsh("generate", "--server", url, "--stats", *args)
            assert streamed.returncode == 0 and streamed.stdout == a["text"] + "\n"
            assert "tokens/s" in streamed.stderr
        for args in (["Hello <|im_end|> wörld 🙂"], ["--pieces", "Café 🙂"], ["--json", "Hi there"],
                     ["--count", "Hi there"], ["--parse-special", "--json", "<|im_start|>user"],
                     ["--no-bos", "Hi"]):
            here = llmsh("tokenize", "-m", str(chat_model), *args)
            there = llmsh("tokenize", "--server", url, *args)
            assert here.returncode == there.returncode == 0 and here.stdout == there.stdout, (args, there.stderr)
        ids = llmsh("tokenize", "--server", url, "Hello wörld").stdout
        back = subprocess.run([sys.executable, "-m", "llmsh", "tokenize", "--decode", "--server", url], env=env,
                              input=ids, capture_output=True, text=True, timeout=60)
        assert back.stdout == "Hello wörld"
        src = tmp_path / "t.txt"
        src.write_text(TEXT * 3 + "\n", encoding="utf-8")
        for args in (["-c", "16"], ["-c", "16", "--json"], ["--stride", "8", "-c", "16", "--json"],
                     ["-c", "16", "--all-tokens"]):
            here = llmsh("ppl", "-m", str(chat_model), *args, str(src))
            there = llmsh("ppl", "--server", url, *args, str(src))
            assert here.returncode == there.returncode == 0 and here.stdout == there.stdout, (args, there.stderr)
        rows_here, rows_there = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
        llmsh("ppl", "-m", str(chat_model), "-c", "16", "--per-token", str(rows_here), "--top-logprobs", "2", str(src))
        r = llmsh("ppl", "--server", url, "-c", "16", "--per-token", str(rows_there), "--top-logprobs", "2", str(src))
        assert r.returncode == 0, r.stderr
        a = [json.loads(x) for x in rows_here.read_text().splitlines()]
        b = [json.loads(x) for x in rows_there.read_text().splitlines()]
        assert [(x["source"], x["position"], x["id"], x["text"]) for x in a] == \
            [(x["source"], x["position"], x["id"], x["text"]) for x in b]
        assert [x["logprob"] for x in a] == pytest.approx([x["logprob"] for x in b], abs=1e-9)
        assert llmsh("ppl", "--server", url, "--each-line", str(src)).returncode == 2
        # No torch in the client: a command run in-process, then a look at what it imported.
        code = ("import sys; from llmsh.cli.main import cli; "
                f"rc = cli.main(['generate', '--server', {url!r}, '-n', '3', 'Hi'], standalone_mode=False); "
                "print('torch' in sys.modules, rc, file=sys.stderr)")
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
        assert r.stderr.strip().splitlines()[-1] == "False 0", r.stderr
        bad = llmsh("generate", "-m", str(chat_model), "hi", server=url)
        assert bad.returncode == 2 and "--model is the server's" in bad.stderr
        long = llmsh("generate", "--server", url, "x " * 400)
        assert long.returncode == 1 and long.stderr.startswith("llmsh: error: the server at ")
    finally:
        _stop(proc)
    gone = llmsh("generate", "--server", url, "hi")
    assert gone.returncode == 1
    assert gone.stderr == f"llmsh: error: cannot reach the llmsh server at {url}: Connection refused\n"


def test_an_eos_that_ends_a_completion_has_its_logprob(lm):
    """lm-evaluation-harness sends max_tokens 1 and drops the last logprob as the generated token:
    a reply ended by EOS must still have that entry, or the prompt's last token would be dropped."""
    from types import SimpleNamespace

    from llmsh.sampling import SamplingParams
    from llmsh.server import generation
    from llmsh.server.worker import Job

    ids = lm.tokenizer.encode("Hello, how are you")
    job = Job(lambda job: None, asyncio.new_event_loop())
    greedy = SamplingParams(temperature=0)
    first = generation.generate(generation.ModelState(lm, 64), job, ids, greedy, max_tokens=1, stops=[],
                                logprobs=1, echo_logprobs=1)
    (tok,) = first.token_ids
    as_eos = SimpleNamespace(decoder=lm.decoder, tokenizer=lm.tokenizer, device=lm.device, eos_ids=[tok])
    r = generation.generate(generation.ModelState(as_eos, 64), job, ids, greedy, max_tokens=1, stops=[],
                            logprobs=1, echo_logprobs=1, eos_logprob=True)
    assert r.finish_reason == "stop" and r.completion_tokens == 0
    assert [e.id for e in r.logprobs] == [tok]
    assert r.logprobs[0].logprob == pytest.approx(first.logprobs[0].logprob, abs=1e-5)
    assert [e.logprob for e in r.prompt_logprobs] == [e.logprob for e in first.prompt_logprobs]


@pytest.mark.slow
def test_chat_shell_through_a_server(chat_model, lm, tmp_path):  # noqa: F811
    """The REPL on a RemoteChatSession: slash commands work, a reply equals the local shell's
    (greedy), /undo and /regen keep the conversation as locally; piped chat without torch."""
    import io

    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from llmsh.cli.client import Server, _chat_session_class
    from llmsh.cli.repl import run_chat
    from llmsh.sampling import SamplingParams

    def drive(keys, **kw):
        out, err = io.StringIO(), io.StringIO()
        with create_pipe_input() as inp:
            inp.send_text(keys)
            rc = run_chat(kw.pop("model", None), input=inp, output=DummyOutput(), stdout=out, stderr=err,
                          history=False, **kw)
        return rc, out.getvalue(), err.getvalue()

    proc, url = _start_server(["-m", str(chat_model)])
    try:
        here, there = tmp_path / "here.json", tmp_path / "there.json"
        keys = "/system Be brief.\nHello, how are you today?\n/regen\nsecond\n/undo\n/show\n/save {}\n/exit\n"
        rc, out, err = drive(keys.format(here), model=lm, params=SamplingParams(temperature=0), max_tokens=6)
        assert rc == 0
        session = _chat_session_class()(Server(url), params={"temperature": 0}, max_tokens=6)
        rc2, out2, err2 = drive(keys.format(there), session=session, stats=True)
        assert rc2 == 0, err2
        a, b = json.loads(here.read_text()), json.loads(there.read_text())
        assert a["messages"] == b["messages"] and a["system"] == b["system"] == "Be brief."
        assert len(b["messages"]) == 2 and out2.split("\n")[:2] == out.split("\n")[:2], (out, out2)
        assert "dropped the last exchange: 'second'" in err2 and f"served at {url}" in err2
        assert "tokens/s" in err2 and "error" not in err2
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        code = ("import sys, io; from llmsh.cli.main import cli; sys.stdin = io.StringIO('Hello, how are you today?'); "
                f"rc = cli.main(['chat', '--server', {url!r}, '-t', '0', '-n', '6'], standalone_mode=False); "
                "print('torch' in sys.modules, rc, file=sys.stderr)")
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert r.stderr.strip().splitlines()[-1] == "False 0", r.stderr
        from llmsh.session import ChatSession

        want = "".join(ChatSession(lm, params=SamplingParams(temperature=0), max_tokens=6)
                       .send("Hello, how are you today?"))
        assert r.stdout == want + "\n"
    finally:
        _stop(proc)
