"""``llmsh serve``: load the model once and serve it over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import click

from . import output
from .common import CONTEXT_SETTINGS, chat_template_option, load, model_options, quantize_option, use_chat_template
from ..errors import InputError


@click.command(context_settings=CONTEXT_SETTINGS,
               short_help="Serve the model over an OpenAI-compatible HTTP API.")
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, metavar="HOST",
              help="Address to listen on. Anything but loopback (127.0.0.1, ::1, localhost) "
                   "needs --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8088, show_default=True, metavar="PORT",
              help="TCP port (0: a free one, printed at start).")
@click.option("--api-key", envvar="LLMSH_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on every request [env: LLMSH_API_KEY].")
@click.option("--max-queue", type=click.IntRange(1), default=16, show_default=True, metavar="N",
              help="Requests that may wait for the model; one more gets 503 with Retry-After.")
@click.option("-c", "--n-ctx", type=click.IntRange(16), default=None, metavar="N",
              help="Context (KV cache) length in tokens: prompt plus reply must fit "
                   "[default: the model's, capped at 8192].")
@click.option("--access-log", is_flag=True, help="Log one line per request to stderr.")
@chat_template_option
@quantize_option
def serve(model, device, dtype, host, port, api_key, max_queue, n_ctx, access_log, chat_template, quantize):
    """Serve the model over HTTP until Ctrl-C or SIGTERM.

    The model is loaded once and answers requests one at a time, in order, from a queue of at
    most --max-queue waiting requests. The KV cache of the last request is kept, so a request
    that starts like the previous one (a chat client resending the conversation) only processes
    its new tokens. Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions,
    POST /v1/completions (echo and logprobs score a prompt's own tokens), POST /tokenize,
    POST /detokenize, POST /perplexity. Sampling fields a request leaves out take the model's
    defaults (generation_config.json), as the other commands do. For a model without a chat
    template (a base model), /v1/chat/completions answers 400 unless --chat-template gives one.

    \b
    Examples:
      llmsh serve
      llmsh serve -m ./my-model --port 9000
      LLMSH_API_KEY=secret llmsh serve --host 0.0.0.0
      curl -s localhost:8088/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi"}]}'
      llmsh generate --server http://127.0.0.1:8088 "Hi"    (client mode: no model load)
    """
    from ..server import bind, create_app, is_loopback, serve as run_server

    api_key = api_key or None
    if not is_loopback(host) and api_key is None:
        raise click.UsageError(f"--host {host} is reachable from other machines: give --api-key KEY "
                               "(or LLMSH_API_KEY)")
    sock = bind(host, port)       # a busy port fails now, not after the model has loaded
    try:
        lm = load(model, device, dtype, quantize)
        use_chat_template(lm, chat_template)
        if n_ctx is not None and n_ctx > lm.n_ctx_max:
            raise InputError(f"--n-ctx {n_ctx} is larger than the model's context ({lm.n_ctx_max} tokens)")
    except BaseException:
        sock.close()
        raise
    app = create_app(lm, model_id=model if model and "/" not in model and not model.endswith(".gguf") else None,
                     n_ctx=n_ctx, api_key=api_key, max_queue=max_queue)
    run_server(app, host, port, sock=sock, notice=output.notice, log_level="info" if access_log else "warning",
               access_log=access_log)
